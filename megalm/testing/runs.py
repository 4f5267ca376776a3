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
    """The records of metrics.jsonl; a last line still being written (no newline yet: a live run read
    while it logs) is left out."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def step_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> loss; a step logged twice (a killed run, then its resumption) keeps the last."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def loss_steps(run_dir: str | Path) -> list[int]:
    """The step of every loss record of metrics.jsonl in the order written (a resumed run appends)."""
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


def assert_resumed(run_dir: str | Path, written_before: int, checkpoint_step: int, last_step: int) -> None:
    """The loss records appended after the first `written_before` run from the checkpoint's step + 1
    to last_step (a run that ignored the checkpoint and replayed from step 1 with the same seeds logs
    the same losses, but from step 1), and each step up to the checkpoint's was logged once."""
    steps = loss_steps(run_dir)
    assert steps[written_before:] == list(range(checkpoint_step + 1, last_step + 1)), steps
    assert all(steps.count(s) == 1 for s in range(1, checkpoint_step + 1)), steps


def hf_loss_on_first_batch(hf_dir: str | Path, run_dir: str | Path, prefix: str) -> float:
    """transformers' mean loss (fp32) of the model in `hf_dir` on the first global batch the run in
    `run_dir` (its config.yaml, its tokenizer) trains on from the shards at `prefix`."""
    import torch  # noqa: PLC0415 - heavy, and only these tests need it
    import transformers  # noqa: PLC0415

    from megalm import seams  # noqa: PLC0415
    from megalm.config import load_config  # noqa: PLC0415
    from megalm.data.builder import build_datasets  # noqa: PLC0415
    from megalm.data.tokenizer import build_tokenizer  # noqa: PLC0415

    cfg = load_config(Path(run_dir) / "config.yaml", [f"data.train_prefixes=[{prefix}]", "train.steps=1"])
    cfg = cfg.validate(cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.expert)  # the smallest world it runs at
    t = cfg.train
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    train, _, _ = build_datasets(cfg.data, tokenizer, t.seed,
                                 (t.steps * t.global_batch_size, t.eval_steps * t.global_batch_size, 0))
    batch = torch.stack([torch.from_numpy(train[i].astype("int64")) for i in range(t.global_batch_size)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, **seams.dtype_kwargs(torch.float32)).eval()
    with torch.no_grad():
        return seams.causal_lm_loss(hf, batch[:, :-1], batch[:, 1:]).item()
