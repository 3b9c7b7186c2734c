"""Session-wide test setup, loaded before any test module imports triton.

Without a GPU, Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET must be
set before `triton.jit` decorates them. On a GPU machine the same tests run the kernels natively.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent / "tests"))  # the tests import `helpers`

from helpers import require_triton  # noqa: E402  (after the path above)


def runs_triton(item) -> bool:
    """A test of the Triton backend: parametrized with backend="triton", or marked `triton`."""
    callspec = getattr(item, "callspec", None)
    return (callspec is not None and callspec.params.get("backend") == "triton") \
        or item.get_closest_marker("triton") is not None


def pytest_collection_modifyitems(items):
    """Under the Triton interpreter (no GPU) a Triton test runs the kernel program by program in
    numpy, seconds to minutes each: the fast loop (-m "not slow") leaves those out."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        for item in items:
            if runs_triton(item):
                item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def triton_available(request):
    """A Triton test needs triton to import: skip with the reason on a laptop, fail under CI."""
    if runs_triton(request.node):
        require_triton()


# Lines a test wants shown at the end of the run even when it passes (lm_kernels/test_aot.py's
# one-line summary of the ahead-of-time compile table).
_TERMINAL_NOTES: list[str] = []


@pytest.fixture
def terminal_notes():
    return _TERMINAL_NOTES


def pytest_terminal_summary(terminalreporter):
    for line in _TERMINAL_NOTES:
        terminalreporter.write_line(line)
