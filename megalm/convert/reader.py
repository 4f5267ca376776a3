"""Read any megalm checkpoint into one unsharded state dict (megalm GPT names at tensor size 1).

What DeepSpeed writes per model-parallel rank m = pipeline_stage * tensor + tensor_rank (both
megalm's mpu and DeepSpeed's pipeline grid number them so), data-parallel rank d:

    layout               weights (training dtype)                      fp32 master weights
    ZeRO 0               mp_rank_{m}_model_states.pt ["module"]        (the module, when fp32)
    ZeRO 1/2             mp_rank_{m}_model_states.pt ["module"]        [bf16_]zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt
    ZeRO 3               (placeholders only)                            [bf16_]zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt
                                                                        + zero_pp_rank_{d}_mp_rank_{m}_model_states.pt (shapes)
    pipeline             layer_{LL}-model_{tp}-model_states.pt          as ZeRO 1, names "{layer}.x" / "tied_modules.embed.x"

The fp32 masters are preferred (a bf16 run's module weights are rounded copies); they are
reassembled per model-parallel rank with deepspeed.utils.zero_to_fp32's own helpers (through
megalm.seams.zero_fp32_state), then the
tensor shards are concatenated along each parameter's `partition_dim` (with its
`partition_stride`, read from a TP=1 GPT built on the meta device) and the vocabulary padding is
stripped. DeepSpeed's files hold pickled optimizer objects: they are loaded with
torch.load(weights_only=False), so read only checkpoints you trust; megalm's own exports are
safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megalm import seams
from megalm.config import Config
from megalm.data.tokenizer import build_tokenizer
from megalm.errors import MegalmError
from megalm.model.gpt import VOCAB_PARAMETERS
from megalm.parallel.layers import unshard_tensor
from megalm.parallel.pipeline import TIED_PREFIX, gpt_name
from megalm.parallel.sharding import sharding_specs
from megalm.parallel.vocab import strip_vocab_padding
from megalm.training.checkpoint import TAG_RE
from megalm.training.checkpoint_meta import METADATA_FILE, CheckpointMeta


@dataclass
class MegalmCheckpoint:
    """A resolved global_stepN directory and its metadata (megalm.json)."""

    path: Path
    meta: CheckpointMeta

    @property
    def config(self) -> Config:
        return self.meta.config

    @property
    def tensor(self) -> int:
        return self.meta.dims.tensor

    @property
    def pipeline(self) -> int:
        return self.meta.dims.pipeline

    @property
    def step(self) -> int:
        return self.meta.state.step

    def tokenizer(self) -> Any:
        """The run's megalm tokenizer, from the files stored in the checkpoint."""
        d = self.config.data
        model = ""
        if d.tokenizer_type != "byte":
            model = str(self.path / "tokenizer" / Path(d.tokenizer_model).name)
        return build_tokenizer(d.tokenizer_type, model)


def resolve_checkpoint(path: str | Path) -> Path:
    """RUN_DIR, RUN_DIR/checkpoints (its `latest`) or a global_stepN directory -> global_stepN."""
    p = Path(path)
    if not p.exists():
        raise MegalmError(f"checkpoint path {p} does not exist")
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file():
            p = root / (root / "latest").read_text().strip()
            break
    if not p.is_dir() or not TAG_RE.match(p.name) or not (p / METADATA_FILE).is_file():
        raise MegalmError(f"{path} is not a megalm checkpoint (expected RUN_DIR, RUN_DIR/checkpoints with a "
                          f"'latest' file, or a global_stepN directory holding {METADATA_FILE})")
    return p


def open_checkpoint(path: str | Path) -> MegalmCheckpoint:
    ckpt = resolve_checkpoint(path)
    return MegalmCheckpoint(ckpt, CheckpointMeta.read(ckpt))


def _module_weights(ckpt: Path, mp: int, tensor: int, pipelined: bool) -> dict[str, torch.Tensor]:
    """The module's own weights (training dtype) of model-parallel rank `mp`."""
    if not (ckpt / f"mp_rank_{mp:02d}_model_states.pt").is_file():
        raise MegalmError(f"{ckpt}: no mp_rank_{mp:02d}_model_states.pt (incomplete checkpoint?)")
    if not pipelined:
        module = seams.load_deepspeed_file(ckpt / f"mp_rank_{mp:02d}_model_states.pt")["module"]
        if module is None or any(v.numel() == 0 for v in module.values()):
            raise MegalmError(f"{ckpt}: rank {mp} holds no module weights and no fp32 masters")
        return dict(module)
    stage_names = seams.load_deepspeed_file(ckpt / f"mp_rank_{mp:02d}_model_states.pt")["param_shapes"]
    layers = sorted({int(n.split(".")[0]) for g in stage_names for n in g if n[0].isdigit()})
    if any(n.startswith(TIED_PREFIX) for g in stage_names for n in g) and 0 not in layers and mp // tensor == 0:
        layers.insert(0, 0)
    out = {}
    for idx in layers:
        f = ckpt / f"layer_{idx:02d}-model_{mp % tensor:02d}-model_states.pt"
        if f.is_file():
            out.update({f"{idx}.{k}": v for k, v in seams.load_deepspeed_file(f).items()})
    return out


def read_rank(ckpt: MegalmCheckpoint, mp: int, prefer_master: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """GPT-named fp32 weights held by model-parallel rank `mp`, and which source they came from."""
    pipelined = ckpt.pipeline > 1
    state, source = (seams.zero_fp32_state(ckpt.path, mp), "fp32 master weights") if prefer_master else (None, "")
    if state is None:
        state, source = _module_weights(ckpt.path, mp, ckpt.tensor, pipelined), "module weights"
    out = {}
    for name, value in state.items():
        g = gpt_name(name, ckpt.config.model.num_layers)
        if g not in out:  # the tied head's copy equals the embedding
            out[g] = value.float()
    return out, source


UNIVERSAL_STATE_DIR, UNIVERSAL_PARAM = "zero", "param"
"""A universal checkpoint's zero/<name>/<state>.pt files hold {"param": tensor} (DeepSpeed's format)."""


def universal_state_file(ckpt: Path, name: str, key: str) -> Path:
    """Where a universal checkpoint keeps state `key` (fp32, exp_avg, exp_avg_sq, step) of `name`."""
    return ckpt / UNIVERSAL_STATE_DIR / name / f"{key}.pt"


def read_state(ckpt: MegalmCheckpoint, prefer_master: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The full model: GPT names, tensor size 1, fp32, vocabulary padding stripped."""
    cfg = ckpt.config.model
    specs = sharding_specs(cfg)
    if ckpt.meta.kind == "universal":
        missing = [n for n in specs if not universal_state_file(ckpt.path, n, "fp32").is_file()]
        if missing:
            raise MegalmError(f"{ckpt.path}: the universal checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
        state = {n: seams.load_deepspeed_file(universal_state_file(ckpt.path, n, "fp32"))[UNIVERSAL_PARAM] for n in specs}
        return state, "fp32 master weights (universal)"
    per_tp: list[dict[str, torch.Tensor]] = [{} for _ in range(ckpt.tensor)]
    sources = set()
    for mp in range(ckpt.tensor * ckpt.pipeline):
        part, source = read_rank(ckpt, mp, prefer_master)
        sources.add(source)
        for k, v in part.items():
            per_tp[mp % ckpt.tensor].setdefault(k, v)
    missing = sorted(set(specs) - set(per_tp[0]))
    if missing:
        raise MegalmError(f"{ckpt.path}: checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
    return merge_tensor_shards(per_tp, specs, cfg.vocab_size), " + ".join(sorted(sources))


def merge_tensor_shards(
    per_tp: list[dict[str, torch.Tensor]], specs: dict[str, tuple[int, int]], vocab_size: int
) -> dict[str, torch.Tensor]:
    """Unshard every parameter (replicated ones from tensor rank 0) and strip the vocabulary padding."""
    out = {}
    for name, (dim, stride) in specs.items():
        full = per_tp[0][name] if dim < 0 else unshard_tensor([p[name] for p in per_tp], dim, stride)
        if name in VOCAB_PARAMETERS:
            full = strip_vocab_padding(full, vocab_size, dim=0)
        out[name] = full.contiguous()
    return out
