"""Errors that are the user's to fix, and how an entry point reports them.

A `UsageError` names the file, field or key at fault and says what to do. Entry points
catch it, print one readable message and exit with status 2, so that a bad input costs
seconds and never a stack trace.
"""
from __future__ import annotations

import functools
import sys

USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """A problem with the user's input (paths, fields, config keys), exit status 2."""


class DataError(UsageError):
    """A prepared shard directory that is missing, corrupt or does not fit the model."""


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
