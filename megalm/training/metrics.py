"""Throughput, FLOPs and MFU, and the three sinks of every logged scalar: console, JSONL, TensorBoard.

MFU = achieved model FLOP/s per device / the device's peak bf16 FLOP/s. Model FLOPs per token are
counted twice: the PaLM convention (6N + 12 L d T, embeddings and head excluded) and the Megatron
convention (also the LM head); megalm reports both (`mfu` is PaLM's, `mfu_megatron` Megatron's).
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megalm.config import Config
from megalm.errors import MegalmError
from megalm.model.flops import flops_per_token_megatron, flops_per_token_palm

# Dense bf16 tensor-core peaks, TFLOP/s per device (vendor datasheets, SXM parts).
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0}


def device_peak_tflops(configured: float = 0.0) -> float:
    """The configured peak if set, else the table's entry for this CUDA device, else 0 (unknown)."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().upper()
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value
    return 0.0


@dataclass
class Throughput:
    """Tokens/s, TFLOP/s per device and MFU of one step, from its wall time."""

    flops_per_token: float  # PaLM convention, forward + backward
    flops_per_token_megatron: float
    world_size: int
    peak_tflops: float

    @classmethod
    def of_run(cls, cfg: Config, world_size: int, peak_tflops: float) -> Throughput:
        """FLOPs per token of the run's model at its sequence length in both conventions (Megatron's
        counts the recomputed forward when model.activation_checkpointing is on)."""
        m, seq = cfg.model, cfg.data.seq_len
        return cls(flops_per_token_palm(m, seq), flops_per_token_megatron(m, seq, recompute=m.activation_checkpointing),
                   world_size, peak_tflops)

    def step_metrics(self, tokens: int, seconds: float) -> dict[str, float]:
        tokens_per_s = tokens / max(seconds, 1e-9)
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        tflops_mt = tokens_per_s * self.flops_per_token_megatron / self.world_size / 1e12
        out = {"tokens_per_s": tokens_per_s, "tflops": tflops, "tflops_megatron": tflops_mt}
        if self.peak_tflops > 0:
            out["mfu"] = tflops / self.peak_tflops
            out["mfu_megatron"] = tflops_mt / self.peak_tflops
        return out


def resident_gib() -> float:
    """Memory this process holds now: CUDA allocated bytes, or the resident set on CPU (Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def memory_gib() -> float:
    """Peak memory of this process: CUDA allocator peak, or the resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class MetricsLogger:
    """Writes metrics on rank 0 only; other ranks hold a logger that does nothing."""

    run_dir: Path
    enabled: bool
    console: bool = True
    tensorboard: bool = True
    total_steps: int = 0
    wandb: dict[str, Any] | None = None
    """W&B settings (project, name, mode, config) or None: no W&B."""
    _writer: Any = field(default=None, init=False)
    _wandb_run: Any = field(default=None, init=False)
    _jsonl: Any = field(default=None, init=False)
    _start: float = field(default_factory=time.monotonic, init=False)

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - heavy, only with logging.tensorboard

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self.wandb is not None:
            self._wandb_run = start_wandb(self.run_dir, **self.wandb)

    def log(self, step: int, scalars: dict[str, float], first_step: int = 0, *, quiet: bool = False) -> None:
        """Append to metrics.jsonl and TensorBoard, and print a console line unless `quiet`."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _finite_or_str(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        tagged = {key if key.startswith("lm_eval/") else f"eval/{key}" if key.startswith("val_") else f"train/{key}": value
                  for key, value in scalars.items()}
        if self._writer is not None:
            for tag, value in tagged.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(tagged, step=step)
        if self.console and not quiet:
            print(self._console_line(step, scalars, first_step), flush=True)

    def _console_line(self, step: int, s: dict[str, float], first_step: int) -> str:
        if "val_loss" in s:
            sources = [f"{k.removeprefix('val_loss/')} {v:.4f}" for k, v in s.items() if k.startswith("val_loss/")]
            return " | ".join([f"step {step:>6}", f"val_loss {s['val_loss']:.4f}", f"val_ppl {s['val_ppl']:.2f}", *sources])
        parts = [f"step {step:>6}/{self.total_steps}", f"loss {s['loss']:.4f}", f"lr {s['lr']:.3e}",
                 f"grad_norm {s.get('grad_norm', float('nan')):.3f}",
                 f"tok/s {s.get('tokens_per_s', 0):,.0f}", f"TFLOP/s/dev {s.get('tflops', 0):.3f}"]
        if "mfu" in s:
            parts.append(f"MFU {100 * s['mfu']:.1f}%")
        loads = [v for k, v in s.items() if k.startswith("moe/") and k.endswith("/load_max")]
        if loads:  # the busiest expert of any layer over the mean (1: balanced)
            parts.append(f"moe load {max(loads):.2f}")
        parts.append(f"mem {s.get('mem_gib', 0):.2f}GiB")
        done = step - first_step
        if done > 0:
            eta = (time.monotonic() - self._start) / done * (self.total_steps - step)
            parts.append(f"ETA {_hms(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def start_wandb(run_dir: Path, *, project: str, name: str, mode: str, config: dict[str, Any]) -> Any:
    """A W&B run for `run_dir`, resuming the one its earlier jobs logged to (RUN_DIR/wandb_id)."""
    try:
        import wandb  # noqa: PLC0415 - optional: only with logging.wandb
    except ImportError:
        raise MegalmError("logging.wandb=true needs the wandb package: pip install 'megalm[wandb]'") from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=project, name=name or run_dir.name, id=run_id, resume="allow", mode=mode,
                      dir=str(run_dir), config=config)


def _finite_or_str(value: float) -> float | str:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
