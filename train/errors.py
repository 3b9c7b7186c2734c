"""Errors that are the user's to fix, how an entry point reports them, and the one way to
print a line for the user: `error: ...`, `warning: ...`, `note: ...`, on stderr.

A `UsageError` names the file, field or key at fault and says what to do. Entry points
catch it, print one readable message and exit with status 2, so that a bad input costs
seconds and never a stack trace.
"""
from __future__ import annotations

import functools
import sys

# Exit statuses, the one table: `python -m train` (and a Slurm job's tasks), `python -m
# launcher`. README's list is checked against it (tests/test_errors.py).
DONE_EXIT_CODE = 0
JOB_FAILED_EXIT_CODE = 1
USAGE_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3
NOT_REQUEUED_EXIT_CODE = 4
HEALTH_EXIT_CODE = 5
STORAGE_EXIT_CODE = 74  # EX_IOERR of sysexits.h: a full or read-only file system
WATCHDOG_EXIT_CODE = 75  # EX_TEMPFAIL of sysexits.h: a hang, worth a requeue
EXIT_STATUSES = {
    DONE_EXIT_CODE: "done, or stopped and requeued",
    JOB_FAILED_EXIT_CODE: "python -m launcher: the job or its prepare job failed, or it can "
                          "never start",
    USAGE_EXIT_CODE: "a usage error, before anything started (the launcher: nothing submitted)",
    NONFINITE_EXIT_CODE: "a non-finite loss (nonfinite: stop)",
    NOT_REQUEUED_EXIT_CODE: "stopped but not requeued (scontrol requeue failed, or "
                            "requeue_without_progress)",
    HEALTH_EXIT_CODE: "a node failed its health check, before training",
    STORAGE_EXIT_CODE: "a checkpoint save or the export found the disk full or the file "
                       "system read-only; the previous checkpoint is still the latest",
    WATCHDOG_EXIT_CODE: "the watchdog ended a hung run",
}
# Not a status a user meets: the tests' fault injection (train/run/faults.py) kills rank 0 with it.
FAULT_EXIT_CODE = 17


def note(message: str) -> None:
    """Something the user may want to know; the run goes on as asked."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Something the user should look at; the run goes on, but maybe not as they meant."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class UsageError(Exception):
    """A problem with the user's input (paths, fields, config keys), exit status 2."""


class DataError(UsageError):
    """A prepared shard directory that is missing, corrupt or does not fit the model."""


class StorageError(Exception):
    """A checkpoint save or an export that found the disk full or the file system read-only:
    one line naming the path, the bytes needed and the bytes free; exit status 74. Every rank of
    the run raises it (the save agrees on failure collectively), none hangs."""


def exits_cleanly_on_usage_error(main):
    """Decorate a CLI `main`: a UsageError becomes `error: ...` on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(USAGE_EXIT_CODE) from None

    return wrapper
