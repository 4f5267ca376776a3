"""Console-script entry points (`megalm-<tool>`): each runs megalm.cli.<tool>.main under run_cli,
so a user error is one stderr line and exit code 2, as with `python tools/<tool>.py`.

The tools are the modules of this package, and that directory is the only list of them: setup.py
makes one console script per module, `megalm.cli.entry:<tool>` resolves through the module-level
`__getattr__` below, and tools/<tool>.py is the same main as a script.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from megalm.errors import run_cli

NOT_TOOLS = ("__init__", "entry")


def tools() -> list[str]:
    """Every tool: the modules of megalm/cli (setup.py lists the same directory)."""
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in NOT_TOOLS)


def _entry(module: str) -> Callable[[], NoReturn]:
    def entry() -> NoReturn:
        run_cli(importlib.import_module(module).main)  # imported when run: one tool loads only its own code

    entry.__name__ = module.rsplit(".", 1)[-1]
    return entry


def __getattr__(name: str) -> Callable[[], NoReturn]:
    if name in tools():
        return _entry(f"megalm.cli.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


train = _entry("megalm.train")
