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


# Test files whose tests must run on one pytest-xdist worker: the Slurm tests share their
# module's test cluster (slurmctld and two slurmd on fixed ports), which one worker starts.
ONE_WORKER_FILES = ("tests/test_slurm.py",)


def pytest_collection_modifyitems(items):
    """Under the Triton interpreter (no GPU) a Triton test runs the kernel program by program in
    numpy, seconds to minutes each: the fast loop (-m "not slow") leaves those out.

    Under pytest-xdist (pytest.ini runs two workers), the longest work goes out first, so that no
    worker is left with a long test while the other has nothing: the one-worker files, then the
    other slow tests, then the rest. Without workers the order stays the files' own."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        for item in items:
            if runs_triton(item):
                item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        def weight(item):
            return 0 if item.nodeid.startswith(ONE_WORKER_FILES) else \
                1 if item.get_closest_marker("slow") else 2
        items.sort(key=weight)  # stable: each file's tests keep their order


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, called only where it runs
def pytest_xdist_make_scheduler(config, log):
    """Each test is its own unit of work, except the one-worker files, each one unit. (Not
    xdist's `--dist loadgroup`: with pytest 9.2 and xdist 3.8 it split a group's tests over both
    workers, and each started a test cluster on the same ports.)"""
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerFiles(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in ONE_WORKER_FILES else nodeid

    return OneWorkerFiles(config, log)


@pytest.fixture(autouse=True)
def triton_available(request):
    """A Triton test needs triton to import: skip with the reason on a laptop, fail under CI."""
    if runs_triton(request.node):
        require_triton()


# Lines a test wants shown at the end of the run even when it passes (lm_kernels/test_aot.py's
# one-line summary of the ahead-of-time compile table). They travel in the test's report
# (user_properties), which pytest-xdist carries from a worker to the process that prints.
_TERMINAL_NOTES: list[str] = []


class _Notes:
    def __init__(self, node):
        self.node = node

    def append(self, line: str):
        self.node.user_properties.append(("terminal_note", line))


@pytest.fixture
def terminal_notes(request):
    return _Notes(request.node)


def pytest_runtest_logreport(report):
    if report.when == "call":
        _TERMINAL_NOTES.extend(v for k, v in report.user_properties if k == "terminal_note")


def pytest_terminal_summary(terminalreporter):
    for line in _TERMINAL_NOTES:
        terminalreporter.write_line(line)
