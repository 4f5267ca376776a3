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
reassembled per model-parallel rank with deepspeed.utils.zero_to_fp32's own helpers, then the
tensor shards are concatenated along each parameter's `partition_dim` (with its
`partition_stride`, read from a TP=1 GPT built on the meta device) and the vocabulary padding is
stripped. DeepSpeed's files hold pickled optimizer objects: they are loaded with
torch.load(weights_only=False), so read only checkpoints you trust; megalm's own exports are
safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from megalm.config import Config, ModelConfig, config_from_dict
from megalm.errors import MegalmError
from megalm.training.checkpoint import TAG_RE

TIED_PREFIX = "tied_modules.embed."
VOCAB_PARAMS = ("embedding.word.weight", "head.linear.weight")


@dataclass
class MegalmCheckpoint:
    """A resolved global_stepN directory and what megalm.json says about it."""

    path: Path
    config: Config
    meta: dict[str, Any]

    @property
    def tensor(self) -> int:
        return int(self.meta["parallel"]["tensor"])

    @property
    def pipeline(self) -> int:
        return int(self.meta["parallel"]["pipeline"])

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    def tokenizer(self) -> Any:
        """The run's megalm tokenizer, from the files stored in the checkpoint."""
        from megalm.data.tokenizer import build_tokenizer

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
    if not p.is_dir() or not TAG_RE.match(p.name) or not (p / "megalm.json").is_file():
        raise MegalmError(f"{path} is not a megalm checkpoint (expected RUN_DIR, RUN_DIR/checkpoints with a "
                          "'latest' file, or a global_stepN directory holding megalm.json)")
    return p


def open_checkpoint(path: str | Path) -> MegalmCheckpoint:
    ckpt = resolve_checkpoint(path)
    meta = json.loads((ckpt / "megalm.json").read_text(encoding="utf-8"))
    raw = yaml.safe_load(meta.get("config_yaml") or (ckpt / "config.yaml").read_text(encoding="utf-8"))
    return MegalmCheckpoint(ckpt, config_from_dict(raw, str(ckpt / "config.yaml")), meta)


def sharding_specs(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """name -> (partition_dim, partition_stride) of every GPT parameter; dim -1: replicated.

    Read from the parameters' own attributes (set by the tensor-parallel layers) of a one-block
    GPT on the meta device; every block shares block 0's layout."""
    from megalm.model.gpt import GPT

    small = dataclasses.replace(cfg, num_layers=1)
    with torch.device("meta"):
        model = GPT(small, None)
    specs = {}
    for name, p in model.named_parameters():
        spec = (p.partition_dim, p.partition_stride) if p.tensor_model_parallel else (-1, 1)
        if name.startswith("blocks.0."):
            for i in range(cfg.num_layers):
                specs[f"blocks.{i}." + name[len("blocks.0."):]] = spec
        else:
            specs[name] = spec
    return specs


def gpt_name(name: str, num_layers: int) -> str | None:
    """PipelineModule parameter name -> GPT name ("3.attn.qkv.weight" -> "blocks.2.attn.qkv.weight").
    Layers: 0 Embedding, 1..L blocks, L+1 FinalNorm, L+2 Head; None for the tied head's copy."""
    if name.startswith(TIED_PREFIX):
        return "embedding." + name[len(TIED_PREFIX):]
    m = re.match(r"^(\d+)\.(.*)$", name)
    if not m:
        return name  # already a GPT name
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0:
        return "embedding." + rest
    if idx <= num_layers:
        return f"blocks.{idx - 1}.{rest}"
    return ("final_norm." if idx == num_layers + 1 else "head.") + rest


def _load(path: Path) -> Any:
    # DeepSpeed's files pickle optimizer objects (LossScaler, enums): weights_only=True cannot read them
    return torch.load(path, map_location="cpu", weights_only=False)


def _master_weights(ckpt: Path, mp: int) -> dict[str, torch.Tensor] | None:
    """fp32 masters of model-parallel rank `mp` (every data-parallel partition), or None."""
    from deepspeed.utils import zero_to_fp32 as z

    optim = sorted(ckpt.glob(f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt"), key=_dp_rank)
    if not optim:
        return None
    zero3 = sorted(ckpt.glob(f"zero_pp_rank_*_mp_rank_{mp:02d}_model_states.pt"), key=_dp_rank)
    model_files = zero3 or [ckpt / f"mp_rank_{mp:02d}_model_states.pt"]
    states = [_zero_model_state(z, _load(f)) for f in model_files]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress prints
        stage, world, groups, paddings = z.parse_optim_states([str(f) for f in optim], str(ckpt))
        if stage <= 2:
            state = z._get_fp32_state_dict_from_zero2_checkpoint(world, groups, states, False, paddings)
        else:
            state = z._get_fp32_state_dict_from_zero3_checkpoint(world, groups, states, False)
    return {k: v.contiguous().clone() if torch.is_tensor(v) else v.contiguous() for k, v in state.items()}


def _zero_model_state(z: Any, sd: dict[str, Any]) -> Any:
    """zero_to_fp32's view of a model-states file (its own parser fails on a pipeline stage's
    file, whose "module" is None: the weights are in the layer files)."""
    module = sd.get("module") or {}
    buffers = {k: v.float() if v.is_floating_point() else v for k, v in module.items() if k in sd["buffer_names"]}
    return z.zero_model_state(
        buffers=buffers, param_shapes=sd["param_shapes"], shared_params=list((sd.get("shared_params") or {}).items()),
        ds_version=sd.get("ds_version"), frozen_param_shapes=sd.get("frozen_param_shapes"),
        frozen_param_fragments=sd.get("frozen_param_fragments"),
    )


def _dp_rank(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def _module_weights(ckpt: Path, mp: int, tensor: int, pipelined: bool) -> dict[str, torch.Tensor]:
    """The module's own weights (training dtype) of model-parallel rank `mp`."""
    if not (ckpt / f"mp_rank_{mp:02d}_model_states.pt").is_file():
        raise MegalmError(f"{ckpt}: no mp_rank_{mp:02d}_model_states.pt (incomplete checkpoint?)")
    if not pipelined:
        module = _load(ckpt / f"mp_rank_{mp:02d}_model_states.pt")["module"]
        if module is None or any(v.numel() == 0 for v in module.values()):
            raise MegalmError(f"{ckpt}: rank {mp} holds no module weights and no fp32 masters")
        return dict(module)
    stage_names = _load(ckpt / f"mp_rank_{mp:02d}_model_states.pt")["param_shapes"]
    layers = sorted({int(n.split(".")[0]) for g in stage_names for n in g if n[0].isdigit()})
    if any(n.startswith(TIED_PREFIX) for g in stage_names for n in g) and 0 not in layers and mp // tensor == 0:
        layers.insert(0, 0)
    out = {}
    for idx in layers:
        f = ckpt / f"layer_{idx:02d}-model_{mp % tensor:02d}-model_states.pt"
        if f.is_file():
            out.update({f"{idx}.{k}": v for k, v in _load(f).items()})
    return out


def read_rank(ckpt: MegalmCheckpoint, mp: int, prefer_master: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """GPT-named fp32 weights held by model-parallel rank `mp`, and which source they came from."""
    pipelined = ckpt.pipeline > 1
    state, source = (_master_weights(ckpt.path, mp), "fp32 master weights") if prefer_master else (None, "")
    if state is None:
        state, source = _module_weights(ckpt.path, mp, ckpt.tensor, pipelined), "module weights"
    out = {}
    for name, value in state.items():
        g = gpt_name(name, ckpt.config.model.num_layers)
        if g is not None and g not in out:  # the tied head's copy equals the embedding
            out[g] = value.float()
    return out, source


def read_state(ckpt: MegalmCheckpoint, prefer_master: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The full model: GPT names, tensor size 1, fp32, vocabulary padding stripped."""
    cfg = ckpt.config.model
    specs = sharding_specs(cfg)
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
    from megalm.parallel.layers import strip_vocab_padding, unshard_tensor

    out = {}
    for name, (dim, stride) in specs.items():
        full = per_tp[0][name] if dim < 0 else unshard_tensor([p[name] for p in per_tp], dim, stride)
        if name in VOCAB_PARAMS:
            full = strip_vocab_padding(full, vocab_size, dim=0)
        out[name] = full.contiguous()
    return out
