"""Checks the command-line entry points share (their errors: `store.errors.run_cli`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from store.errors import UserError


def check_output_dir(path: str | Path, flag: str) -> None:
    """An output folder the command is about to create or fill: refused in one line when it
    is a file, or when this process cannot create files where it would go (permission, a
    read-only filesystem, a file on the way), before anything is written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; choose a folder")
    parent = path
    while not parent.exists():  # the nearest part of the path that exists
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, so no folder can be made under "
                        f"it; choose another place")
    try:  # the one sure test (root passes access(2) on read-only and virtual filesystems)
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=parent))
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create folders in {parent} ({e.strerror}); "
                        f"choose a place you can write to") from None
