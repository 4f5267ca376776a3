"""AdamW with decay / no-decay parameter groups, and a guard that skips non-finite updates.

Weight decay applies to matrices only: norms, biases (ndim < 2) and, unless
`optimizer.decay_embeddings`, the token/position embeddings and the output head are not decayed
(GPT-NeoX / Megatron practice). Under expert parallelism the experts' matrices form their own
decayed group, marked as DeepSpeed wants an expert group ("moe": True, "name": the expert group's
name), so that ZeRO partitions their states over the ranks holding the same experts. Under
optimizer.name=muon the decayed matrices that take Muon form their own group ("muon": True, first),
and the expert groups (all of their matrices take Muon) are marked Muon: a group is all Muon or all
AdamW, which lets megalm's Muon step ZeRO 1/2's flat partitions (megalm.training.muon).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megalm.config import ModelConfig, OptimizerConfig
from megalm.model.gpt import Embedding, Head
from megalm.model.moe import is_expert_parallel
from megalm.parallel.groups import communication_device


def embedding_parameters(model: nn.Module) -> set[int]:
    """ids of the token/position embeddings and the output head, found by module type (parameter
    names differ between the plain model and a PipelineModule)."""
    found: set[int] = set()
    for module in model.modules():
        if isinstance(module, (Embedding, Head, nn.Embedding)):
            found.update(id(p) for p in module.parameters())
    return found


def param_groups(model: nn.Module, cfg: OptimizerConfig, muon: set[int] | None = None) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group, and the expert-parallel
    experts' own group (empty groups dropped); with `muon` (ids of the parameters taking Muon), those
    of the decayed group in a group of their own, and the expert groups marked Muon."""
    muon_decay, decay, no_decay, experts = [], [], [], {}
    embeddings = embedding_parameters(model)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if is_expert_parallel(p):  # megalm.model.moe.GroupedExperts under parallel.expert > 1
            experts.setdefault(p.group_name, []).append(p)
        elif p.ndim < 2 or (id(p) in embeddings and not cfg.decay_embeddings):
            no_decay.append(p)
        elif muon is not None and id(p) in muon:
            muon_decay.append(p)
        else:
            decay.append(p)
    marked = {"muon": True} if muon is not None else {}
    groups = [
        {"params": muon_decay, "weight_decay": cfg.weight_decay, "name": "muon", "muon": True},
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        *({"params": ps, "weight_decay": cfg.weight_decay, "name": name, "moe": True, **marked}
          for name, ps in experts.items()),
    ]
    return [g for g in groups if g["params"]]


def nonfinite_gradients(grads: list[torch.Tensor], group: dist.ProcessGroup | None) -> bool:
    """Whether any gradient on any rank has a non-finite entry (one fused norm, a MAX all-reduce)."""
    bad = torch.zeros(1, device=communication_device(group))
    if grads:  # the norm of the gradients is finite exactly when every entry is
        bad += (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float().to(bad.device)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return bool(bad.item())


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW that skips the whole update when any gradient on any rank is non-finite.

    DeepSpeed's ZeRO-0 bf16/fp16 wrapper already skips such steps; the plain fp32 path hands
    gradients straight to this optimizer and ZeRO's bf16 optimizer does not check, so the check
    lives here (one fused norm over the gradients). `overflow` is the
    attribute DeepSpeed's engine reads to count a skipped step and hold the LR schedule.
    """

    def __init__(self, params: Iterable, group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.guard_group = group
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = nonfinite_gradients(grads, self.guard_group)
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, guard: bool = True, *, model_cfg: ModelConfig | None = None,
                    tensor_group: dist.ProcessGroup | None = None) -> torch.optim.Optimizer:
    """torch's fused AdamW (one multi-tensor kernel on CUDA and CPU; nothing JIT-compiled, unlike
    DeepSpeed's FusedAdam, which builds a CUDA extension with nvcc on first use), guarded against
    non-finite gradients when `guard` (not needed under DeepSpeed's ZeRO-0 bf16/fp16 wrapper,
    which skips a step whose gradient norm is not finite). optimizer.name=muon: megalm's Muon
    (megalm.training.muon) over the same groups, its matrices gathered over `tensor_group`."""
    if cfg.name == "muon":
        from megalm.training.muon import Muon, muon_matrices  # noqa: PLC0415

        matrices = muon_matrices(model, model_cfg)
        return Muon(param_groups(model, cfg, set(matrices)), cfg, matrices, tensor_group, guard=guard)
    groups = param_groups(model, cfg)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    return GuardedAdamW(groups, **kwargs) if guard else torch.optim.AdamW(groups, **kwargs)
