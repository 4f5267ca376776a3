"""User-facing errors and the one place that turns them into a one-line message and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class MegalmError(ValueError):
    """A mistake the user can fix (bad path, bad config, inconsistent sizes). The message says how."""


USER_ERROR_EXIT = 2


def fail(message: str) -> NoReturn:
    """Print one line to stderr and exit with code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT)


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI entry point: user errors become one stderr line and exit 2, never a traceback."""
    try:
        code = main()
    except MegalmError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)
