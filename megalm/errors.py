"""User-facing errors and the one place that turns them into a one-line message and exit code 2."""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import NoReturn


class MegalmError(ValueError):
    """A mistake the user can fix (bad path, bad config, inconsistent sizes). The message says how."""


USER_ERROR_EXIT = 2


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI entry point: user errors become one stderr line and exit 2, never a traceback."""
    try:
        code = main() or 0
    except MegalmError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    exit_process(code)


def exit_process(code: int) -> NoReturn:
    """Exit with `code`. A rank of a torch.distributed job destroys its process groups (after a
    success) and ends here, without the interpreter's teardown: gloo's C++ threads can still be
    releasing tensors of the last collective when Python finalizes, and Python then stops them
    inside a C++ frame, which aborts the process ('terminate called without an active exception',
    exit 134, seen at the end of a successful mpirun job). Exit handlers (logging, child processes,
    temporary files) run first; every file megalm writes is closed before this point."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        raise SystemExit(code)
    if code == 0:
        dist.destroy_process_group()  # a failing rank does not wait for its peers here
    atexit._run_exitfuncs()  # noqa: SLF001 - the documented exit handlers, run before os._exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
