"""Helpers for tests that launch real training runs and read what they wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def train_env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: CPU accelerator, one thread, gloo over loopback. The
    repository goes first on PYTHONPATH, before what was there (packages installed with --target)."""
    env = dict(os.environ)
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=path)
    env.update(extra)
    return env


def gpu_env(**extra: str) -> dict[str, str]:
    """The environment of a run on this machine's first GPU: DeepSpeed's CUDA accelerator, NCCL."""
    env = train_env(DS_ACCELERATOR="cuda", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"), **extra)
    env.pop("OMP_NUM_THREADS")
    return env


def read_metrics(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> loss; a step logged twice (a killed run, then its resumption) keeps the last."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
