"""Console-script entry points (`megalm-<tool>`): each runs megalm.cli.<tool>.main under run_cli,
so a user error is one stderr line and exit code 2, as with `python tools/<tool>.py`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NoReturn

from megalm.errors import run_cli

TOOLS = ["train_tokenizer", "preprocess_data", "merge_datasets", "bench_data", "convert_checkpoint",
         "generate", "evaluate", "plan", "benchmark", "parity"]


def _entry(tool: str) -> Callable[[], NoReturn]:
    def entry() -> NoReturn:
        run_cli(importlib.import_module(f"megalm.cli.{tool}").main)

    entry.__name__ = tool
    return entry


for _tool in TOOLS:
    globals()[_tool] = _entry(_tool)


def train() -> NoReturn:
    from megalm.train import main

    run_cli(main)
