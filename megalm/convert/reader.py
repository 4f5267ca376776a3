"""Read any megalm checkpoint one parameter at a time (megalm GPT names, tensor size 1, fp32).

What DeepSpeed writes per model-parallel rank m = pipeline_stage * tensor + tensor_rank (both
megalm's mpu and DeepSpeed's pipeline grid number them so), data-parallel rank d:

    layout               weights (training dtype)                      fp32 master weights, Adam moments
    ZeRO 0               mp_rank_{m}_model_states.pt ["module"]        ["optimizer"] of the same file
    ZeRO 1/2             mp_rank_{m}_model_states.pt ["module"]        [bf16_]zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt
    ZeRO 3               (placeholders only)                            [bf16_]zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt
                                                                        + zero_pp_rank_{d}_mp_rank_{m}_model_states.pt (shapes)
    pipeline             layer_{LL}-model_{tp}-model_states.pt          as ZeRO 1, names "{layer}.x" / "tied_modules.embed.x"
    expert parallel E    routed experts: experts_ep{e}_mp_rank_{m}.pt   ZeRO 0: ["optimizer"] of that file; ZeRO 1/2:
                         (expert rank e's E / P of them)                the expert group's partitions of the ranks
                                                                        d with d % P == e (seams.ZeroPartitions)
    universal            zero/<name>/{fp32,exp_avg,exp_avg_sq|momentum_buffer,step}.pt  (megalm.convert.universal)
                         buffers/<name>.pt (persistent buffers: the MoE expert bias)

`CheckpointReader.full(name, key)` returns one parameter's full tensor: the fp32 masters are
preferred (a bf16 run's module weights are rounded copies), read from the ZeRO partitions of each
tensor rank (megalm.seams.ZeroPartitions: only the bytes of that parameter are copied out of the
memory-mapped files), joined along the parameter's `partition_dim` / `partition_stride`
(megalm.parallel.sharding) with the vocabulary padding stripped, and routed experts' expert ranks
joined along dimension 0. Memory holds one parameter at a
time, so converting a 70B checkpoint needs about twice its largest parameter, not the model.
Every DeepSpeed file is read with weights_only=True and an allowlist (megalm.seams).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megalm import seams
from megalm.config import Config
from megalm.data.tokenizer import build_tokenizer
from megalm.errors import MegalmError
from megalm.model.gpt import GPT, VOCAB_PARAMETERS
from megalm.model.moe import GroupedExperts, mark_expert_parallel
from megalm.parallel.context import TensorParallel
from megalm.parallel.layers import unshard_tensor
from megalm.parallel.pipeline import gpt_name, pipeline_layer
from megalm.parallel.sharding import buffer_names, routed_expert_names, sharding_specs
from megalm.parallel.vocab import strip_vocab_padding
from megalm.training import manifest
from megalm.training.checkpoint import TAG_RE, older_checkpoints
from megalm.training.checkpoint_meta import METADATA_FILE, CheckpointMeta
from megalm.training.muon import muon_matrices
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

    def __init__(self, ckpt: MegalmCheckpoint, mp: int, prefer_master: bool, expert_rank: int = 0) -> None:
        self.ckpt, self.mp, self.tp_rank, self.expert_rank = ckpt, mp, mp % ckpt.tensor, expert_rank
        self.model_file = ckpt.path / f"mp_rank_{mp:02d}_model_states.pt"
        experts = ckpt.meta.dims.expert
        self.zero = seams.ZeroPartitions.open(ckpt.path, mp, expert_rank, experts) if prefer_master else None
        if self.zero is None and not self.model_file.is_file():
            raise MegalmError(f"{ckpt.path}: no {self.model_file.name} (incomplete checkpoint?)")
        self.experts_file = ckpt.path / f"experts_ep{expert_rank:02d}_mp_rank_{mp:02d}.pt" if experts > 1 else None
        if self.experts_file is not None and not self.experts_file.is_file():
            raise MegalmError(f"{ckpt.path}: no {self.experts_file.name} (incomplete checkpoint?)")
        self._zero0: tuple[dict[str, int], list[torch.Tensor] | None, dict] | None = None
        self._experts: dict | None = None

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

    def keys(self, name: str) -> tuple[str, ...]:
        """The states this rank's parameter `name` (its module's name) has: "fp32", then its optimizer's."""
        if self.zero is not None:
            return self.zero.keys(name)
        experts = self.routed_experts()
        if name in experts.get("params", {}):
            state = experts.get("optimizer", {}).get(name, {})
        elif self.ckpt.pipeline > 1:
            state = {}
        else:
            index, _, optim = self._zero0_state()
            state = optim.get("state", {}).get(index.get(name), {})
        return ("fp32", *(k for k in seams.OPTIMIZER_KEYS[1:] if k in state))

    def step(self) -> float:
        if self.zero is not None:
            return self.zero.step
        states = self._zero0_state()[2].get("state") if self.ckpt.pipeline == 1 else None
        steps = [float(s["step"]) for s in (states or {}).values() if "step" in s]  # Muon's matrices keep none
        return steps[0] if steps else 0.0

    def tensor(self, name: str, key: str) -> torch.Tensor:
        if self.zero is not None:
            return self.zero.tensor(name, key)
        experts = self.routed_experts()
        if name in experts.get("params", {}):  # expert parallelism: this expert rank's own file
            saved = experts.get("optimizer", {}).get(name, {})
            if key in saved:
                return saved[key].clone()
            if key != "fp32":
                raise MegalmError(f"{self.experts_file}: no {key} of {name}")
            return experts["params"][name].float().clone()
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

    def routed_experts(self) -> dict:
        """Under expert parallelism the experts file of this rank's expert rank ({"params": module
        weights, at ZeRO-0 "optimizer": name -> fp32 master and moments}); else empty."""
        if self._experts is None:
            self._experts = seams.load_deepspeed_file(self.experts_file) if self.experts_file is not None else {}
        return self._experts

    def buffers(self, wanted: set[str]) -> dict[str, torch.Tensor]:
        """The buffers named in `wanted` (GPT names) that this rank's module files hold."""
        num_layers = self.ckpt.config.model.num_layers
        if self.ckpt.pipeline > 1:
            found = {}
            for path in sorted(self.ckpt.path.glob(f"layer_*-model_{self.tp_rank:02d}-model_states.pt")):
                idx = int(re.match(r"layer_(\d+)-", path.name).group(1))
                found.update({gpt_name(f"{idx}.{k}", num_layers): v for k, v in seams.load_deepspeed_file(path).items()})
        else:
            found = {gpt_name(k, num_layers): v for k, v in (seams.load_deepspeed_file(self.model_file).get("module") or {}).items()}
        return {k: v.clone() for k, v in found.items() if k in wanted}

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
                order = [n for group in optimizer_order(self.ckpt.config, self.ckpt.meta.dims.expert) for n in group]
                flat = [m for group in masters for m in group] if masters is not None else None
                self._zero0 = ({n: i for i, n in enumerate(order)}, flat, optim)
        return self._zero0


def optimizer_order(cfg: Config, experts: int = 1) -> list[list[str]]:
    """The parameter names of each of megalm's optimizer groups, in the order the optimizer holds
    them (a model on the meta device, grouped as training groups it: names do not depend on layout,
    except that under expert parallelism the routed experts form a group of their own)."""
    with torch.device("meta"):
        model = GPT(cfg.model, TensorParallel.build(None))
    if experts > 1:
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                for p in module.parameters():
                    mark_expert_parallel(p, experts)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = set(muon_matrices(model, cfg.model)) if cfg.optimizer.name == "muon" else None  # as build_optimizer groups
    return [[names[id(p)] for p in group["params"]] for group in param_groups(model, cfg.optimizer, muon)]


class CheckpointReader:
    """A checkpoint of any layout read one parameter at a time: `full(name, key)` is GPT parameter
    `name`'s full tensor (tensor size 1, vocabulary padding stripped, fp32) for `key` "fp32" (the
    master weights when the checkpoint has them, else the module's) or an Adam moment."""

    def __init__(self, ckpt: MegalmCheckpoint, prefer_master: bool = True) -> None:
        self.ckpt, self.model = ckpt, ckpt.config.model
        self.specs = sharding_specs(self.model)
        self.experts = routed_expert_names(self.model)
        self.universal = ckpt.meta.kind == "universal"
        self.where: dict[str, list[tuple[_RankWeights, str]]] = {}
        if self.universal:
            missing = [n for n in self.specs if not universal_state_file(ckpt.path, n, "fp32").is_file()]
            if missing:
                raise MegalmError(f"{ckpt.path}: the universal checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
            return
        expert_ranks = ckpt.meta.dims.expert
        ranks = [_RankWeights(ckpt, mp, prefer_master, e) for e in range(expert_ranks)
                 for mp in range(ckpt.tensor * ckpt.pipeline)]
        found: dict[str, dict[tuple[int, int], tuple[_RankWeights, str]]] = {}
        for rank in ranks:
            for module_name in rank.names():
                name = gpt_name(module_name, self.model.num_layers)
                if rank.expert_rank == 0 or name in self.experts:  # dense: expert rank 0's copy
                    # the first copy: a tied head's copy on the last stage comes after the embedding's
                    found.setdefault(name, {}).setdefault((rank.expert_rank, rank.tp_rank), (rank, module_name))
        self.where = {name: [by[k] for k in sorted(by)] for name, by in found.items()}  # expert-major, then tensor
        missing = sorted(n for n in self.specs
                         if len(self.where.get(n, ())) < ckpt.tensor * (expert_ranks if n in self.experts else 1))
        if missing:
            raise MegalmError(f"{ckpt.path}: checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
        self.ranks = ranks

    @property
    def source(self) -> str:
        if self.universal:
            return "fp32 master weights (universal)"
        return " + ".join(sorted({r.source for r in self.ranks}))

    def keys(self, name: str) -> tuple[str, ...]:
        """The states GPT parameter `name` has: fp32, and once the optimizer has stepped its optimizer's
        (Adam's two moments; Muon's momentum for Muon's matrices), on every rank holding a piece."""
        if self.universal:
            return tuple(k for k in seams.OPTIMIZER_KEYS if universal_state_file(self.ckpt.path, name, k).is_file())
        common = set.intersection(*(set(rank.keys(module_name)) for rank, module_name in self.where[name]))
        return tuple(k for k in seams.OPTIMIZER_KEYS if k in common)

    def step(self) -> float:
        """Adam's step count (0 before the optimizer's first step)."""
        if self.universal:
            path = universal_state_file(self.ckpt.path, next(iter(self.specs)), "step")
            return float(seams.load_deepspeed_file(path)[UNIVERSAL_PARAM])
        return self.ranks[0].step()

    def buffers(self) -> dict[str, torch.Tensor]:
        """The model's persistent buffers by GPT name (the MoE expert bias; empty for most models)."""
        wanted = set(buffer_names(self.model))
        if not wanted:
            return {}
        if self.universal:
            found = {n: seams.load_deepspeed_file(universal_buffer_file(self.ckpt.path, n))[UNIVERSAL_PARAM]
                     for n in wanted if universal_buffer_file(self.ckpt.path, n).is_file()}
        else:
            found = {}
            for rank in self.ranks:
                if rank.expert_rank == 0 and rank.tp_rank == 0:
                    found.update(rank.buffers(wanted))
        missing = sorted(wanted - set(found))
        if missing:
            raise MegalmError(f"{self.ckpt.path}: the checkpoint lacks the model's buffer {missing[0]} (and "
                              f"{len(missing) - 1} more): written by a megalm that did not keep it")
        return found

    def full(self, name: str, key: str = "fp32") -> torch.Tensor:
        if self.universal:
            return seams.load_deepspeed_file(universal_state_file(self.ckpt.path, name, key))[UNIVERSAL_PARAM]
        dim, stride = self.specs[name]
        located = self.where[name][:1] if dim < 0 else self.where[name]  # replicated: tensor rank 0's copy
        shards = [rank.tensor(module_name, key).float() for rank, module_name in located]
        if name in self.experts:  # expert ranks in order, each its tensor ranks: join tensor, then experts
            t = self.ckpt.tensor
            return torch.cat([unshard_tensor(shards[i:i + t], dim, stride) for i in range(0, len(shards), t)]).contiguous()
        full = shards[0] if dim < 0 else unshard_tensor(shards, dim, stride)
        if name in VOCAB_PARAMETERS:
            full = strip_vocab_padding(full, self.model.vocab_size, dim=0)
        return full.contiguous()


UNIVERSAL_STATE_DIR, UNIVERSAL_PARAM = "zero", "param"
"""A universal checkpoint's zero/<name>/<state>.pt files hold {"param": tensor} (DeepSpeed's format)."""


def universal_state_file(ckpt: Path, name: str, key: str) -> Path:
    """Where a universal checkpoint keeps state `key` (OPTIMIZER_KEYS, step) of `name`."""
    return ckpt / UNIVERSAL_STATE_DIR / name / f"{key}.pt"


def universal_buffer_file(ckpt: Path, name: str) -> Path:
    """Where a universal checkpoint keeps buffer `name` (megalm's addition to DeepSpeed's layout)."""
    return ckpt / "buffers" / f"{name}.pt"


def read_state(ckpt: MegalmCheckpoint, prefer_master: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The whole model's fp32 weights (GPT names, tensor size 1, vocabulary padding stripped) and where
    they came from; for consumers that hold the model anyway (generate, evaluate, verification)."""
    reader = CheckpointReader(ckpt, prefer_master)
    return {**{name: reader.full(name) for name in reader.specs}, **reader.buffers()}, reader.source
