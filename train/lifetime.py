"""Processes that end with the one that started them: killing the top process of a run or a
prepare (even with SIGKILL, which no handler sees) leaves no worker alive.

- A direct child asks the kernel for a signal when its parent ends (Linux's PR_SET_PDEATHSIG):
  prepare's tokenizer workers (SIGKILL: they hold nothing worth saving) and torchrun's ranks
  (SIGTERM: a clean stop with a checkpoint, train/run/preemption.py).
- A process further down watches a pid (`stop_with`): the tasks of `python -m launcher --cluster
  local --wait` are children of submitit's controller, not of the launcher; when the launcher is
  gone they send themselves SIGTERM and stop as a preempted run does.
Elsewhere than Linux, die_with_parent does nothing (the watch works wherever /proc does).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_WITH_ENV = "TRAIN_STOP_WITH_PID"  # the launcher's pid, for the tasks of a local job


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Have the kernel send sig to this process when its parent ends. parent: the pid the
    parent had (multiprocessing.parent_process().pid), to catch a parent that died first."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid() if parent is None else parent
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), sig)


def started(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat), or None when it is gone: a pid
    reused by another process has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop_with(pid: int, sig: int = signal.SIGTERM, every_s: float = 1.0) -> None:
    """A daemon thread that sends sig to this process once process pid has ended."""
    def stop():
        print(f"note: process {pid}, which started this one, has ended: stopping",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), sig)

    first = started(pid)
    if first is None:
        stop()
        return

    def watch():
        while started(pid) == first:
            time.sleep(every_s)
        stop()

    threading.Thread(target=watch, name="stop-with", daemon=True).start()


_watched: set[int] = set()


def stop_with_the_environment() -> None:
    """stop_with the pid that STOP_WITH_ENV names, if it names one (set by the launcher); once
    per process."""
    pid = os.environ.get(STOP_WITH_ENV)
    if pid and pid.isdigit() and int(pid) not in _watched:
        _watched.add(int(pid))
        stop_with(int(pid))
