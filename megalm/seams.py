"""Every place megalm reaches below DeepSpeed's or transformers' documented API, in one module.

Each seam is one small function with a test of its own (tests/test_seams.py) that fails when the
installed version stops behaving as megalm assumes, instead of a run silently changing. setup.py
states the versions these are tested with.

DeepSpeed
    skip_op_build(name)                  mark an op incompatible (deepspeed.ops.__compatible_ops__)
                                         so DeepSpeed never tries its JIT build
    record_fp32_grad_norm(engine)        ZeRO-0 fp32 clips in `clip_fp32_gradients` and drops the norm:
                                         clip by the whole model's norm (its own misses other pipeline
                                         stages) and keep it in `_global_grad_norm`
    skip_gradient_allreduce(engine)      `enable_backward_allreduce = False` (one data rank, ZeRO-0)
    register_expert_groups(name, ..)     megalm's expert and expert-data groups as DeepSpeed's named
                                         ones (deepspeed.utils.groups), which its engine and ZeRO use
    deepspeed_sees_experts(cls)          while deepspeed.initialize runs, its engine counts modules of
                                         `cls` as MoE layers (it knows only deepspeed.moe.layer.MoE):
                                         expert gradients reduced over the expert-data group
    dense_checkpoint_files(engine)       save/load its checkpoint files as for a dense model (its MoE
                                         files assume its own module names); megalm writes the experts
    set_progress(engine, step, samples)  `global_steps` / `global_samples`, saved in its checkpoint
    checkpoint_writes(engine, save)      route its checkpoint file writes through `save` (async saves)
    checkpoint_reads(engine)             its checkpoint file reads through load_deepspeed_file (no pickle
                                         that would run code is loaded when training resumes)
    collect_write_errors(engine)         record a failed write of its checkpoint engine instead of
                                         raising between its barriers (the other ranks would wait)
    partition_zero3_over(model, group, ..) ZeRO-3 under context parallelism: convert the parameters
                                         over data x context (DeepSpeed's own conversion uses the
                                         data group only, so gradients would miss the context sum)
    sum_zero3_gradients_over_context(engine, C)  ZeRO-3's reduce-scatter averages over data x
                                         context where every other path sums over context: x C
    load_deepspeed_file(path)            its files with weights_only=True and the allowlist of the
                                         types it pickles (deepspeed_pickled_types)
    prepare_optimizer_state(engine, step) create the Adam state DeepSpeed makes lazily, linked to
                                         ZeRO-1/2's fragments; set_full_state(engine, param, values):
                                         a parameter's master and moments at any ZeRO stage
    zero0_optimizer_state(model_states)  the optimizer state a ZeRO-0 model-states file holds
    zero0_full_state(engine, param)      a parameter's fp32 master and moments at ZeRO-0 (the inverse
                                         of set_full_state)
    zero_flat_groups(engine)             ZeRO-1/2's flat layout: each group's parameters, their offsets
                                         in its flat vector, the partition size and the ranks sharing it
    ZeroPartitions.open(ckpt, mp)        the fp32 masters and Adam moments of one model-parallel rank
                                         in DeepSpeed's flat ZeRO 1-3 partitions (zero_to_fp32's layout),
                                         read one parameter at a time (its own reader merges whole
                                         groups in memory and not a pipeline stage's files)
torch
    default_group_timeout(timeout)       the timeout of groups created without one (DeepSpeed's)
transformers (version 5 spellings)
    rope_kwargs(), rope_parameters_of()  RoPE as `rope_parameters={"rope_type", "rope_theta", ...}`
    dtype_kwargs(dtype)                  `dtype=` (version 4: `torch_dtype=`)
    causal_lm_loss(model, x, labels)     `shift_labels=`: labels that are already the next tokens
    spm_tokenizer_json(model_file)       convert_slow_tokenizer's SpmConverter / SentencePieceExtractor

Both packages are heavy to import, so each function imports what it needs when called.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import math
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed import distributed_c10d

from megalm.errors import MegalmError

# ----------------------------------------------------------------------------- DeepSpeed


def skip_op_build(name: str) -> None:
    """Never JIT-build DeepSpeed op `name` (e.g. deepspeed_shm_comm, an inference all-reduce whose
    build costs ~90 s on CPU): DeepSpeed skips ops its compatibility table marks False."""
    import deepspeed.ops  # noqa: PLC0415 - heavy

    if name not in deepspeed.ops.__compatible_ops__:
        raise RuntimeError(f"DeepSpeed {deepspeed.__version__} has no op {name!r} in __compatible_ops__")
    deepspeed.ops.__compatible_ops__[name] = False


def record_fp32_grad_norm(engine: Any) -> None:
    """DeepSpeed's plain fp32 path (ZeRO-0) clips in `clip_fp32_gradients` but throws the norm
    away: clip by megalm's norm of the whole model's gradient (`_global_grad_norm`) and keep it for
    logging. DeepSpeed's clip_grad_norm_ there counts a replicated tensor on model-parallel rank 0
    only, and under a pipeline that rank is one stage's (the other stages' norms and biases were
    missed), and it averages expert-parallel ranks' norms (each rank holds other experts)."""
    from deepspeed.utils import groups  # noqa: PLC0415 - heavy

    def clip_and_record() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        experts = [p for p in params if getattr(p, "allreduce", True) is False]
        expert_group = groups._get_expert_parallel_group(experts[0].group_name) if experts else None
        norm = _global_grad_norm(params, engine.mpu, expert_group)
        coef = min(1.0, engine.gradient_clipping() / (norm + 1e-6)) if engine.gradient_clipping() > 0 else 1.0
        for p in params:
            p.grad.mul_(coef)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_and_record


def _global_grad_norm(params: list[torch.Tensor], mpu: Any, expert_group: Any) -> float:
    """The L2 norm of every gradient of the model, each counted once: a tensor-parallel shard on each
    tensor rank, a replicated tensor on tensor rank 0 of its pipeline stage, a pipeline-tied copy (the
    tied head on the last stage, `ds_pipe_replicated`) on its owner's stage only, routed experts
    summed over the expert group as well; all summed over the model-parallel (pipeline x tensor) group."""
    import torch.distributed as dist  # noqa: PLC0415

    dense, experts = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    first = mpu.get_tensor_model_parallel_rank() == 0
    for p in params:
        if getattr(p, "ds_pipe_replicated", False):
            continue
        square = p.grad.detach().double().square().sum().cpu()
        if getattr(p, "allreduce", True) is False:
            experts += square
        elif first or getattr(p, "tensor_model_parallel", False):
            dense += square
    if expert_group is not None:
        dist.all_reduce(experts, group=expert_group)
    total = dense + experts
    dist.all_reduce(total, group=mpu.get_model_parallel_group())
    return float(total.sqrt())


def skip_gradient_allreduce(engine: Any) -> None:
    """With one data-parallel rank at ZeRO-0 DeepSpeed would still flatten, 'reduce' over one rank
    and copy back every gradient after each backward."""
    engine.enable_backward_allreduce = False


def register_expert_groups(name: str, expert: Any, expert_data: Any) -> None:
    """Make this rank's expert group and expert-data group DeepSpeed's groups called `name`
    (deepspeed.utils.groups: the engine and ZeRO look expert parameters' groups up by their
    `group_name`), instead of the ones its MoE layer would create with its own rank order."""
    import torch.distributed as dist  # noqa: PLC0415
    from deepspeed.utils import groups  # noqa: PLC0415 - heavy

    groups._EXPERT_PARALLEL_GROUP[name] = expert
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = expert_data
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(expert)
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(expert_data)


@contextlib.contextmanager
def deepspeed_sees_experts(cls: type) -> Iterator[None]:
    """While the context lasts DeepSpeed's engine takes modules of `cls` for MoE layers (it tests
    isinstance(module, deepspeed.moe.layer.MoE) when it is built): `has_moe_layers`, so its
    gradient reduction and ZeRO treat parameters marked allreduce=False by their expert groups."""
    from deepspeed.runtime import engine  # noqa: PLC0415 - heavy

    original = engine.MoE
    engine.MoE = (original, cls)
    try:
        yield
    finally:
        engine.MoE = original


@contextlib.contextmanager
def dense_checkpoint_files(engine: Any) -> Iterator[None]:
    """While saving or loading: DeepSpeed writes and reads its files as for a dense model (its MoE
    path names experts by its own module layout, deepspeed_moe.experts.deepspeed_experts.N). The
    data-parallel writer's model file then holds its own experts; megalm saves every expert rank's
    (megalm.training.checkpoint.save_experts). ZeRO's files hold each rank's partitions either way."""
    moe = engine.has_moe_layers
    engine.has_moe_layers = False
    try:
        yield
    finally:
        engine.has_moe_layers = moe


def partition_zero3_over(model: nn.Module, group: Any, ds_config: dict, mpu: Any, dtype: torch.dtype) -> None:
    """Convert `model`'s parameters to ZeRO-3 parameters partitioned over `group`.

    deepspeed.initialize converts a model built outside zero.Init itself, over
    mpu.get_data_parallel_group() (DeepSpeed 0.19.8, runtime/zero/parameter_offload.py), while its
    ZeRO-3 optimizer and every other stage use the sequence-data-parallel group. Under context
    parallelism those differ: parameters would be partitioned, and their gradients reduce-scattered,
    over the data ranks only, never summed over the context ranks. Converting first, with the same
    call and the data x context group, makes DeepSpeed skip its own conversion (tests/long_context:
    CP2 at ZeRO-3 against one process)."""
    import deepspeed  # noqa: PLC0415 - heavy

    deepspeed.zero.Init(module=model, data_parallel_group=group, config_dict_or_path=ds_config, mpu=mpu, dtype=dtype)


def sum_zero3_gradients_over_context(engine: Any, context: int) -> None:
    """DeepSpeed sums gradients over the sequence (context) ranks and averages them over data ranks:
    every reduction divides by (data x context) / context, except ZeRO-3's reduce-scatter
    (`__avg_scatter_grads`, 0.19.8), which divides by data x context. Scale its partitions by C so
    ZeRO-3 agrees with the other stages (tests/long_context: CP2 at ZeRO-3 against one process)."""
    name = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"
    average = getattr(engine.optimizer, name)

    def sum_over_context(params: list, dtype: torch.dtype) -> list[torch.Tensor]:
        return [g.mul(context) for g in average(params, dtype)]

    setattr(engine.optimizer, name, sum_over_context)


@contextlib.contextmanager
def checkpoint_writes(engine: Any, save: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Route DeepSpeed's checkpoint file writes (`engine.checkpoint_engine.save(state_dict, path)`,
    every file of its checkpoint) through `save` while the context lasts; yields the original."""
    writer = engine.checkpoint_engine
    original = writer.save
    writer.save = save
    try:
        yield original
    finally:
        writer.save = original


@contextlib.contextmanager
def checkpoint_reads(engine: Any) -> Iterator[None]:
    """Route DeepSpeed's checkpoint file reads (`engine.checkpoint_engine.load(path, map_location)`:
    the model, optimizer, pipeline layer and expert files) through load_deepspeed_file while the
    context lasts: weights_only=True with DeepSpeed's pickled types, memory-mapped, on the CPU (where
    every load of its engine maps them: it moves what it keeps to the device itself)."""
    reader = engine.checkpoint_engine
    original = reader.load
    reader.load = lambda path, map_location=None: load_deepspeed_file(Path(path))
    try:
        yield
    finally:
        reader.load = original


@contextlib.contextmanager
def collect_write_errors(engine: Any) -> Iterator[list[BaseException]]:
    """While saving: a write of DeepSpeed's checkpoint engine that fails (OSError: disk full,
    permissions; torch's RuntimeError from its zip writer) is recorded in the yielded list and
    skipped, instead of raising between DeepSpeed's barriers and leaving the other ranks waiting."""
    errors: list[BaseException] = []
    original: list[Callable[..., Any]] = []

    def recording_save(state_dict: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        if errors:
            return None  # this save is lost already: write nothing more
        try:
            return original[0](state_dict, path, *args, **kwargs)
        except (OSError, RuntimeError) as e:
            errors.append(e)
            return None

    with checkpoint_writes(engine, recording_save) as save:
        original.append(save)
        yield errors


def default_group_timeout(timeout: datetime.timedelta) -> None:
    """torch gives a process group created without a timeout (DeepSpeed's, for one) its backend's
    default, 30 minutes, not the world group's: make `timeout` that default
    (torch.distributed.distributed_c10d._get_default_timeout)."""
    distributed_c10d._get_default_timeout = lambda backend: timeout


def set_progress(engine: Any, step: int, consumed_samples: int) -> None:
    """The optimizer steps and samples DeepSpeed records in its checkpoint (the writer's engine
    has taken no step)."""
    engine.global_steps, engine.global_samples = step, consumed_samples


def deepspeed_pickled_types() -> list[type]:
    """The non-tensor types DeepSpeed pickles into its checkpoint files (found by loading every file
    of fp32/bf16, ZeRO 0-3 and pipeline checkpoints; fp16 adds the dynamic loss scaler)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: PLC0415 - heavy
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer doing the update (DeepSpeed's ZeRO and mixed-precision wrappers hold it)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _adam_state_for(opt: torch.optim.Optimizer, group: dict, p: torch.Tensor, step: float) -> dict:
    """opt.state[p], created as torch's Adam would at its first step (zero moments) when missing;
    its step set to `step` (a float32 tensor, on p's device for the fused and capturable kernels)."""
    state = opt.state[p]
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    on_device = group.get("fused") or group.get("capturable")
    state["step"] = torch.tensor(step, dtype=torch.float32, device=p.device if on_device else "cpu")
    return state


def prepare_optimizer_state(engine: Any, step: float) -> None:
    """Give every tensor the optimizer updates its state at `step` (DeepSpeed's ZeRO optimizers create
    it lazily, at the first step): Adam's, or what the optimizer's own `init_state(group, tensor, step)`
    makes (megalm's Muon); link ZeRO-1/2's per-parameter fragments to it, so that set_full_state can
    write a parameter's moments before training resumes."""
    opt, inner = engine.optimizer, _inner_optimizer(engine)
    init = getattr(inner, "init_state", functools.partial(_adam_state_for, inner))
    for group in inner.param_groups:
        for p in group["params"]:
            init(group, p, step)
    for i, flat in enumerate(getattr(opt, "fp32_partitioned_groups_flat", [])):  # ZeRO-3: a sub-group is
        init(inner.param_groups[opt.sub_group_to_group_id[i]], flat, step)  # in a group only in step()
    lp_groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None)
    if lp_groups is not None:  # ZeRO-1/2 and the bf16 optimizer: one flat fp32 partition per group
        for group, lps in zip(inner.param_groups, lp_groups, strict=True):
            for lp in lps:
                if getattr(lp, "_hp_mapping", None) is not None:
                    lp._hp_mapping.set_optim_state_fragment(group["params"][0], inner.state[group["params"][0]])


def set_full_state(engine: Any, param: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
    """Set `param`'s fp32 master ("fp32") and optimizer states (OPTIMIZER_KEYS) from full
    values of this rank's tensor-parallel shard, at any ZeRO stage (after prepare_optimizer_state)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # noqa: PLC0415 - heavy

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # ZeRO 1-3, bf16 optimizer (None: another rank's)
        for key, value in values.items():
            value = value.to(torch.float32)
            safe_set_full_fp32_param(param, value) if key == "fp32" else safe_set_full_optimizer_state(param, value, key)
        return
    inner, master = _inner_optimizer(engine), _zero0_master(engine, param)
    with torch.no_grad():
        for key, value in values.items():
            target = master if key == "fp32" else inner.state[master][key]
            target.copy_(value.to(target.dtype).view_as(target))


def _zero0_master(engine: Any, param: torch.nn.Parameter) -> torch.Tensor:
    """The tensor ZeRO-0's optimizer updates for `param`: itself (fp32), or its fp32 copy (bf16/fp16)."""
    opt, inner = engine.optimizer, _inner_optimizer(engine)
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # ZeRO-0 bf16/fp16: a fp32 copy per param
        return next(m for lps, ms in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                    for lp, m in zip(lps, ms, strict=True) if lp is param)
    if opt is not inner:
        raise RuntimeError(f"{type(opt).__name__}: megalm cannot reach its optimizer state")
    return param


def zero0_full_state(engine: Any, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """At ZeRO-0: `param`'s fp32 master and Adam moments (copies), as set_full_state takes them."""
    master = _zero0_master(engine, param)
    state = _inner_optimizer(engine).state.get(master, {})
    out = {"fp32": master.detach().float().clone()}
    out.update({k: state[k].detach().clone() for k in OPTIMIZER_KEYS[1:] if k in state})
    return out


@dataclass(frozen=True)
class FlatGroup:
    """One optimizer group under ZeRO-1/2: the group's flat vector holds `params` at `offsets` (alignment
    padding after each); rank r of `group` holds and updates elements [r n, (r + 1) n), n = `partition_numel`."""

    params: list[torch.nn.Parameter]
    offsets: list[int]
    partition_numel: int
    group: Any


def zero_flat_groups(engine: Any) -> list[FlatGroup] | None:
    """The flat layout of each of the optimizer's groups at ZeRO-1/2 (DeepSpeed's ZeRO optimizer, in
    its groups' order); None at ZeRO-0 and ZeRO-3."""
    opt = engine.optimizer
    if not hasattr(opt, "round_robin_bit16_offsets") or not hasattr(opt, "single_partition_of_fp32_groups"):
        return None
    return [FlatGroup(list(ps), [int(o) for o in offs], int(n), g)
            for ps, offs, n, g in zip(opt.round_robin_bit16_groups, opt.round_robin_bit16_offsets, opt.partition_size,
                                      opt.real_dp_process_group, strict=True)]


def load_deepspeed_file(path: Path) -> Any:
    """A file DeepSpeed wrote, memory-mapped (tensors are read when touched) and unpickled with
    weights_only=True: tensors, containers, numbers and exactly deepspeed_pickled_types(). Anything
    else (a pickle that would call a function) is refused with a MegalmError, and nothing runs."""
    try:
        with torch.serialization.safe_globals(deepspeed_pickled_types()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
        what = found.group(1) if found else "an object"
        raise MegalmError(f"{path} holds a pickled {what}, which is not among the types DeepSpeed writes: "
                          "refusing to load it (unpickling it could run code)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise MegalmError(f"{path} cannot be read ({str(e).splitlines()[0]}): the file is damaged or "
                          "truncated") from None


def _dp_rank(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


OPTIMIZER_KEYS = ("fp32", "exp_avg", "exp_avg_sq", "momentum_buffer")
"""The per-parameter states a universal checkpoint carries: the fp32 master, and Adam's two moments or
Muon's momentum (megalm.training.muon: its matrices'), whichever the parameter's optimizer keeps."""


@dataclass(frozen=True)
class _Slot:
    """Where one parameter lies in the flat partitions: its group (ZeRO-1/2), its offset in that
    group's flat vector (ZeRO-1/2) or in each rank's concatenated sub-groups (ZeRO-3), its size."""

    group: int
    offset: int
    numel: int
    shape: tuple[int, ...]


@dataclass
class ZeroPartitions:
    """The optimizer partitions of one model-parallel rank of a ZeRO 1-3 (or bf16 optimizer)
    checkpoint, read one parameter at a time: each call maps the data-parallel files it needs
    (load_deepspeed_file: memory-mapped, weights_only) and copies out only that parameter, so memory
    holds one parameter, whatever the checkpoint's size. The flat layouts are zero_to_fp32's:
    ZeRO-1/2 split each group's flat vector (parameters in order, alignment padding after each) into
    equal consecutive partitions; ZeRO-3 splits every parameter into equal padded partitions."""

    files: list[Path]  # one per data-parallel rank
    stage: int
    slots: dict[str, _Slot]
    partition_numel: list[int]  # ZeRO-1/2: of each group; ZeRO-3: of each sub-group, on one rank
    step: float  # Adam's step count (0 before the first optimizer step)
    group_keys: list[tuple[str, ...]]  # the optimizer states each group keeps (none before the first step)
    group_files: list[list[Path]] | None = None
    """ZeRO-1/2: the files holding each group's partitions, in partition order (an expert group's
    are those of the ranks holding the expert rank's experts)."""

    @classmethod
    def open(cls, ckpt: Path, mp: int, expert_rank: int = 0, experts: int = 1) -> ZeroPartitions | None:
        """None when the rank has no optimizer partitions (ZeRO-0). Under expert parallelism
        (`experts` > 1) the expert groups are expert rank `expert_rank`'s: DeepSpeed partitions them over
        the data x context ranks d with d % experts == expert_rank (megalm.parallel.dims)."""
        from deepspeed.checkpoint import constants as c  # noqa: PLC0415 - heavy

        files = sorted(ckpt.glob(f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt"), key=_dp_rank)
        if not files:
            return None
        first = load_deepspeed_file(files[0])[c.OPTIMIZER_STATE_DICT]
        stage, world = int(first.get(c.ZERO_STAGE, 1)), first[c.PARTITION_COUNT]  # bf16 optimizer: no stage
        world = max(world) if isinstance(world, list) else world
        if world != len(files):
            raise MegalmError(f"{ckpt}: {len(files)} optimizer partitions of model-parallel rank {mp}, the "
                              f"checkpoint was written by {world}: the checkpoint is incomplete")
        flat = first[c.SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else c.FP32_FLAT_GROUPS]
        base = first[c.BASE_OPTIMIZER_STATE if stage <= 2 else c.OPTIMIZER_STATE_DICT]["state"]
        model = ckpt / (f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt" if stage == 3
                        else f"mp_rank_{mp:02d}_model_states.pt")
        shapes = load_deepspeed_file(model)["param_shapes"]
        paddings = first.get(c.PARAM_ALIGNMENT_PADDINGS)
        slots = _zero3_slots(shapes, world) if stage == 3 else _zero12_slots(shapes, paddings)
        step = next((float(s["step"]) for s in base.values() if "step" in s), 0.0)  # Muon's groups keep none
        group_keys = [tuple(k for k in OPTIMIZER_KEYS[1:] if k in base.get(g, {})) for g in range(len(flat))]
        counts = first[c.PARTITION_COUNT] if isinstance(first[c.PARTITION_COUNT], list) else [world] * len(flat)
        group_files = [files if n == world else files[expert_rank::experts] for n in counts]
        if any(len(g) != n for g, n in zip(group_files, counts, strict=True)):
            raise MegalmError(f"{ckpt}: the optimizer partitions of model-parallel rank {mp} do not match "
                              f"parallel.expert={experts}: the checkpoint is incomplete or damaged")
        return cls(files, stage, slots, [t.numel() for t in flat], step, group_keys, group_files)

    def names(self) -> list[str]:
        return list(self.slots)

    def keys(self, name: str) -> tuple[str, ...]:
        """The states parameter `name` has: "fp32", then its optimizer's (ZeRO-3: every group's alike)."""
        return ("fp32", *self.group_keys[max(self.slots[name].group, 0)])

    def tensor(self, name: str, key: str) -> torch.Tensor:
        """The full (data-parallel merged) tensor of parameter `name` for `key` in OPTIMIZER_KEYS."""
        slot = self.slots[name]
        if self.stage <= 2:
            size = self.partition_numel[slot.group]
            first, last = slot.offset // size, (slot.offset + slot.numel - 1) // size
            files = self.group_files[slot.group] if self.group_files else self.files
            pieces = [self._flats(files[d], key)[slot.group][max(slot.offset - d * size, 0):
                                                             min(slot.offset + slot.numel - d * size, size)].clone()
                      for d in range(first, last + 1)]
            return torch.cat(pieces).view(slot.shape)
        per_rank = math.ceil(slot.numel / len(self.files))
        bounds = [0, *itertools.accumulate(self.partition_numel)]
        pieces = []
        for path in self.files:
            flats = self._flats(path, key)
            for g, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                start, end = max(slot.offset, lo), min(slot.offset + per_rank, hi)
                if start < end:
                    pieces.append(flats[g][start - lo:end - lo].clone())
        return torch.cat(pieces)[:slot.numel].view(slot.shape)

    def _flats(self, path: Path, key: str) -> list[torch.Tensor]:
        from deepspeed.checkpoint import constants as c  # noqa: PLC0415 - heavy

        sd = load_deepspeed_file(path)[c.OPTIMIZER_STATE_DICT]
        if key == "fp32":
            return sd[c.SINGLE_PARTITION_OF_FP32_GROUPS if self.stage <= 2 else c.FP32_FLAT_GROUPS]
        state = sd[c.BASE_OPTIMIZER_STATE if self.stage <= 2 else c.OPTIMIZER_STATE_DICT]["state"]
        return [state[g].get(key) for g in sorted(state)]


def _zero12_slots(shapes: list[dict], paddings: list[list[int]] | None) -> dict[str, _Slot]:
    slots = {}
    for g, group in enumerate(shapes):
        offset = 0
        for j, (name, shape) in enumerate(group.items()):
            slots[name] = _Slot(g, offset, math.prod(shape), tuple(shape))
            offset += math.prod(shape) + (paddings[g][j] if paddings is not None else 0)
    return slots


def _zero3_slots(shapes: list[dict], world: int) -> dict[str, _Slot]:
    slots, offset = {}, 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        slots[name] = _Slot(-1, offset, math.prod(shape), tuple(shape))
        offset += math.ceil(math.prod(shape) / world)
    return slots


def zero0_optimizer_state(model_states: dict[str, Any]) -> tuple[dict[str, Any], list[list[torch.Tensor]] | None]:
    """(torch optimizer state dict, fp32 masters per param group or None) of a ZeRO-0 model-states
    file: the plain optimizer's state (fp32: the masters are the module weights), or DeepSpeed's
    bf16/fp16 wrapper's (its fp32 copies in "fp32_groups", the inner optimizer's state beside them)."""
    saved = model_states.get("optimizer")
    if not saved:
        raise MegalmError("the checkpoint holds no optimizer state (saved without it)")
    if "optimizer_state_dict" in saved:
        return saved["optimizer_state_dict"], saved["fp32_groups"]
    return saved, None


# ----------------------------------------------------------------------------- transformers


def rope_kwargs(parameters: dict[str, Any]) -> dict[str, Any]:
    """LlamaConfig keywords of RoPE `parameters` ({"rope_type", "rope_theta", and the type's own
    keys}: transformers 5's rope_parameters)."""
    return {"rope_parameters": dict(parameters)}


def rope_parameters_of(config: Any) -> dict[str, Any]:
    """The RoPE parameters of a transformers Llama-like config; none means plain RoPE, base 10000."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", 10000.0)
    return rope


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of configs and from_pretrained (transformers 5: dtype=)."""
    return {"dtype": dtype}


def causal_lm_loss(model: Any, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss of a transformers causal LM whose `labels` are already the next tokens (megalm's
    batches): `shift_labels` stops transformers from shifting them a second time (it views them, so
    they must be contiguous; megalm's labels are a slice of one (batch, seq + 1) buffer)."""
    labels = labels.contiguous()
    return model(input_ids=tokens, labels=labels, shift_labels=labels).loss


def spm_tokenizer_json(model_file: str) -> str:
    """A sentencepiece .model as tokenizer.json: transformers' SpmConverter (unigram), or its
    SentencePieceExtractor into a byte-fallback BPE; the decoder strips the leading space."""
    from tokenizers import Tokenizer, decoders  # noqa: PLC0415 - heavy, only for conversion
    from tokenizers.models import BPE  # noqa: PLC0415
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter  # noqa: PLC0415

    class _Source:  # what SpmConverter reads from a slow tokenizer
        vocab_file = model_file
        add_prefix_space = True

    class _Converter(SpmConverter):
        handle_byte_fallback = True

        def tokenizer(self, proto):  # noqa: ANN001, ANN202 - transformers' signature
            if proto.trainer_spec.model_type != 2:  # unigram: the base class is right
                return super().tokenizer(proto)
            kw = SentencePieceExtractor(model_file).extract(BPE)
            tok = Tokenizer(BPE(kw["vocab"], kw["merges"], unk_token=proto.trainer_spec.unk_piece,
                                fuse_unk=True, byte_fallback=True, dropout=None))
            tok.add_tokens(kw["additional_special_tokens"])
            return tok

        def decoder(self, replacement, add_prefix_space):  # noqa: ANN001, ANN202
            return decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(content=" ", left=1)])

    return _Converter(_Source()).converted().to_str()
