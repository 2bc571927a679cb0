"""User-facing errors, each one line saying what is wrong and what to do, and the one wrapper
every command-line entry point uses to report them.

`UserError` lives here, in the bottom layer, because every package's commands raise it:
`store` is imported by `capture`, `trainer` and `dashboard` alike, and imports none of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user: reported as one line and exit code 2, never a traceback."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def run_cli(fn: Callable[[], int | None]) -> int:
    """Run a command's body: a `UserError` becomes `error: ...` on stderr and exit code 2.
    Under a launcher (torchrun sets RANK) only rank 0 prints it: one line, not one per rank."""
    try:
        rc = fn()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad argument raised as a UserError (one line through `run_cli`)
    instead of argparse's usage block and exit."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


class StoreError(UserError):
    """A problem with a capture store, worded for the user in one line."""


class StoreNotFound(StoreError):
    """No capture store at the given path or URL."""


class SchemaVersionError(StoreError):
    """The store was written with a schema this code does not read (newer, or unknown)."""


class CorruptStore(StoreError):
    """The store's metadata cannot be read, or contradicts itself."""
