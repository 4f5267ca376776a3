"""Read any megalm checkpoint one parameter at a time (megalm GPT names, tensor size 1, fp32).

What DeepSpeed writes per model-parallel rank m = pipeline_stage * tensor + tensor_rank (both
megalm's mpu and DeepSpeed's pipeline grid number them so), data-parallel rank d:

    layout               weights (training dtype)                      fp32 master weights, Adam moments
    ZeRO 0               mp_rank_{m}_model_states.pt ["module"]        ["optimizer"] of the same file
    ZeRO 1/2             mp_rank_{m}_model_states.pt ["module"]        [bf16_]zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt
    ZeRO 3               (placeholders only)                            [bf16_]zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt
                                                                        + zero_pp_rank_{d}_mp_rank_{m}_model_states.pt (shapes)
    pipeline             layer_{LL}-model_{tp}-model_states.pt          as ZeRO 1, names "{layer}.x" / "tied_modules.embed.x"
    universal            zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt  (megalm.convert.universal)

`CheckpointReader.full(name, key)` returns one parameter's full tensor: the fp32 masters are
preferred (a bf16 run's module weights are rounded copies), read from the ZeRO partitions of each
tensor rank (megalm.seams.ZeroPartitions: only the bytes of that parameter are copied out of the
memory-mapped files), joined along the parameter's `partition_dim` / `partition_stride`
(megalm.parallel.sharding) with the vocabulary padding stripped. Memory holds one parameter at a
time, so converting a 70B checkpoint needs about twice its largest parameter, not the model.
Every DeepSpeed file is read with weights_only=True and an allowlist (megalm.seams).
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
from megalm.model.gpt import GPT, VOCAB_PARAMETERS
from megalm.parallel.context import TensorParallel
from megalm.parallel.layers import unshard_tensor
from megalm.parallel.pipeline import gpt_name, pipeline_layer
from megalm.parallel.sharding import sharding_specs
from megalm.parallel.vocab import strip_vocab_padding
from megalm.training import manifest
from megalm.training.checkpoint import TAG_RE, older_checkpoints
from megalm.training.checkpoint_meta import METADATA_FILE, CheckpointMeta
from megalm.training.optimizer import param_groups


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


def open_checkpoint(path: str | Path, *, optimizer: bool = False) -> MegalmCheckpoint:
    """The checkpoint at `path`, checked against its manifest first: every file's size, and the
    sha256 of the files a reader of the weights reads (with `optimizer`, of all files)."""
    ckpt = resolve_checkpoint(path)
    damage = manifest.check(ckpt, digest=True if optimizer else (lambda name: "optim_states" not in name))
    if damage is not None:
        older = older_checkpoints(ckpt.parent, ckpt.name)
        intact = next((ckpt.parent / t for t in older if manifest.check(ckpt.parent / t, digest=False) is None), None)
        where = f"; the newest intact checkpoint is {intact}" if intact else ""
        raise MegalmError(f"checkpoint {ckpt} is damaged: {damage}{where}")
    return MegalmCheckpoint(ckpt, CheckpointMeta.read(ckpt))


class _RankWeights:
    """One model-parallel rank's tensors: its ZeRO partitions (masters and moments), or, without them
    (ZeRO-0) or when the module's weights are asked for, its module weights and ZeRO-0 optimizer state."""

    def __init__(self, ckpt: MegalmCheckpoint, mp: int, prefer_master: bool) -> None:
        self.ckpt, self.mp, self.tp_rank = ckpt, mp, mp % ckpt.tensor
        self.model_file = ckpt.path / f"mp_rank_{mp:02d}_model_states.pt"
        self.zero = seams.ZeroPartitions.open(ckpt.path, mp) if prefer_master else None
        if self.zero is None and not self.model_file.is_file():
            raise MegalmError(f"{ckpt.path}: no {self.model_file.name} (incomplete checkpoint?)")
        self._zero0: tuple[dict[str, int], list[torch.Tensor] | None, dict] | None = None

    @property
    def source(self) -> str:
        return "fp32 master weights" if self.zero is not None or self._zero0_masters() else "module weights"

    def names(self) -> list[str]:
        """The names this rank's module gives its parameters (pipeline names under a pipeline)."""
        if self.zero is not None:
            return self.zero.names()
        states = seams.load_deepspeed_file(self.model_file)
        if self.ckpt.pipeline == 1:
            return list(states["module"] or {})
        return [n for group in states["param_shapes"] or [] for n in group]

    def keys(self) -> tuple[str, ...]:
        if self.zero is not None:
            return seams.OPTIMIZER_KEYS if self.zero.has_moments else ("fp32",)
        if self.ckpt.pipeline > 1:
            return ("fp32",)
        return seams.OPTIMIZER_KEYS if self._zero0_state()[2].get("state") else ("fp32",)

    def step(self) -> float:
        if self.zero is not None:
            return self.zero.step
        states = self._zero0_state()[2].get("state") if self.ckpt.pipeline == 1 else None
        return float(next(iter(states.values()))["step"]) if states else 0.0

    def tensor(self, name: str, key: str) -> torch.Tensor:
        if self.zero is not None:
            return self.zero.tensor(name, key)
        if self.ckpt.pipeline > 1:
            idx, rest = pipeline_layer(name, self.ckpt.config.model.num_layers)
            layer = self.ckpt.path / f"layer_{idx:02d}-model_{self.tp_rank:02d}-model_states.pt"
            return seams.load_deepspeed_file(layer)[rest].float().clone()
        index, masters, optim = self._zero0_state()
        if key != "fp32":
            return optim["state"][index[name]][key].clone()
        if masters is not None:
            return masters[index[name]].clone()
        module = seams.load_deepspeed_file(self.model_file)["module"]
        if module is None or module[name].numel() == 0:
            raise MegalmError(f"{self.ckpt.path}: rank {self.mp} holds no module weights and no fp32 masters")
        return module[name].float().clone()

    def _zero0_masters(self) -> bool:
        return self.ckpt.pipeline == 1 and self._zero0_state()[1] is not None

    def _zero0_state(self) -> tuple[dict[str, int], list[torch.Tensor] | None, dict]:
        """(name -> optimizer index, fp32 masters by index or None, the torch optimizer state)."""
        if self._zero0 is None:
            states = seams.load_deepspeed_file(self.model_file)
            if not states.get("optimizer"):
                self._zero0 = ({}, None, {})
            else:
                optim, masters = seams.zero0_optimizer_state(states)
                order = [n for group in optimizer_order(self.ckpt.config) for n in group]
                flat = [m for group in masters for m in group] if masters is not None else None
                self._zero0 = ({n: i for i, n in enumerate(order)}, flat, optim)
        return self._zero0


def optimizer_order(cfg: Config) -> list[list[str]]:
    """The parameter names of each of megalm's optimizer groups, in the order the optimizer holds
    them (a model on the meta device, grouped as training groups it: names do not depend on layout)."""
    with torch.device("meta"):
        model = GPT(cfg.model, TensorParallel.build(None))
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in param_groups(model, cfg.optimizer)]


class CheckpointReader:
    """A checkpoint of any layout read one parameter at a time: `full(name, key)` is GPT parameter
    `name`'s full tensor (tensor size 1, vocabulary padding stripped, fp32) for `key` "fp32" (the
    master weights when the checkpoint has them, else the module's) or an Adam moment."""

    def __init__(self, ckpt: MegalmCheckpoint, prefer_master: bool = True) -> None:
        self.ckpt, self.model = ckpt, ckpt.config.model
        if ckpt.meta.dims.expert > 1:  # each expert rank's experts are in its own file: refused rather than half-read
            raise MegalmError(f"{ckpt.path} was trained with parallel.expert={ckpt.meta.dims.expert}: the converters "
                              "(reshard, universal, to-hf) do not read expert-parallel checkpoints yet; resume it "
                              "at its own parallel.expert")
        if self.model.moe_bias_update_rate > 0:  # a buffer, not a parameter: refused rather than lost
            raise MegalmError(f"{ckpt.path}: its MoE expert bias (model.moe_bias_update_rate) is not carried by the "
                              "converters yet (reshard, universal, to-hf); resume it at its own layout")
        self.specs = sharding_specs(self.model)
        self.universal = ckpt.meta.kind == "universal"
        self.where: dict[str, list[tuple[_RankWeights, str]]] = {}
        if self.universal:
            missing = [n for n in self.specs if not universal_state_file(ckpt.path, n, "fp32").is_file()]
            if missing:
                raise MegalmError(f"{ckpt.path}: the universal checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
            return
        ranks = [_RankWeights(ckpt, mp, prefer_master) for mp in range(ckpt.tensor * ckpt.pipeline)]
        for rank in ranks:
            for module_name in rank.names():
                per_tp = self.where.setdefault(gpt_name(module_name, self.model.num_layers), [])
                if len(per_tp) < rank.tp_rank + 1:  # the tied head's copy on the last stage comes second
                    per_tp.append((rank, module_name))
        missing = sorted(n for n in self.specs if len(self.where.get(n, ())) < ckpt.tensor)
        if missing:
            raise MegalmError(f"{ckpt.path}: checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
        self.ranks = ranks

    @property
    def source(self) -> str:
        if self.universal:
            return "fp32 master weights (universal)"
        return " + ".join(sorted({r.source for r in self.ranks}))

    def keys(self) -> tuple[str, ...]:
        """The states every parameter has: fp32, and the Adam moments once the optimizer has stepped."""
        if self.universal:
            first = next(iter(self.specs))
            return tuple(k for k in seams.OPTIMIZER_KEYS if universal_state_file(self.ckpt.path, first, k).is_file())
        common = set.intersection(*(set(r.keys()) for r in self.ranks))
        return tuple(k for k in seams.OPTIMIZER_KEYS if k in common)

    def step(self) -> float:
        """Adam's step count (0 before the optimizer's first step)."""
        if self.universal:
            path = universal_state_file(self.ckpt.path, next(iter(self.specs)), "step")
            return float(seams.load_deepspeed_file(path)[UNIVERSAL_PARAM])
        return self.ranks[0].step()

    def full(self, name: str, key: str = "fp32") -> torch.Tensor:
        if self.universal:
            return seams.load_deepspeed_file(universal_state_file(self.ckpt.path, name, key))[UNIVERSAL_PARAM]
        dim, stride = self.specs[name]
        located = self.where[name][:1] if dim < 0 else self.where[name]  # replicated: tensor rank 0's copy
        shards = [rank.tensor(module_name, key).float() for rank, module_name in located]
        full = shards[0] if dim < 0 else unshard_tensor(shards, dim, stride)
        if name in VOCAB_PARAMETERS:
            full = strip_vocab_padding(full, self.model.vocab_size, dim=0)
        return full.contiguous()


UNIVERSAL_STATE_DIR, UNIVERSAL_PARAM = "zero", "param"
"""A universal checkpoint's zero/<name>/<state>.pt files hold {"param": tensor} (DeepSpeed's format)."""


def universal_state_file(ckpt: Path, name: str, key: str) -> Path:
    """Where a universal checkpoint keeps state `key` (fp32, exp_avg, exp_avg_sq, step) of `name`."""
    return ckpt / UNIVERSAL_STATE_DIR / name / f"{key}.pt"


def read_state(ckpt: MegalmCheckpoint, prefer_master: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The whole model's fp32 weights (GPT names, tensor size 1, vocabulary padding stripped) and where
    they came from; for consumers that hold the model anyway (generate, evaluate, verification)."""
    reader = CheckpointReader(ckpt, prefer_master)
    return {name: reader.full(name) for name in reader.specs}, reader.source
