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


# Lines a test wants shown at the end of the run even when it passes (kernels/test_aot.py's
# one-line summary of the ahead-of-time compile table).
_TERMINAL_NOTES: list[str] = []


@pytest.fixture
def terminal_notes():
    return _TERMINAL_NOTES


def pytest_terminal_summary(terminalreporter):
    for line in _TERMINAL_NOTES:
        terminalreporter.write_line(line)
