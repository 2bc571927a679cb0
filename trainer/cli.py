"""What every command-line entry point shares: bad input is one line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from trainer.config import UserError


def run_cli(fn: Callable[[], object]) -> int:
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
