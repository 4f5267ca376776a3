"""Mixture of experts: the router, the grouped experts and the MoE layer that replaces a block's MLP.

Written to be exactly transformers' Mixtral / Qwen3-MoE sparse block (softmax over the router
logits in fp32, top-k, optional renormalisation of the k weights, experts stored fused as
gate_up [E, 2I, H] and down [E, H, I]), with what pretraining adds: sigmoid scores and a scale
(DeepSeek), shared experts with an optional sigmoid gate (Qwen2-MoE), the switch auxiliary loss and
the router z-loss.

Dispatch is dropless: the (token, choice) pairs are sorted by expert and each expert multiplies
its contiguous run of tokens, all experts in one `torch._grouped_mm` where it runs (dimensions
aligned to 16 bytes), else a loop over the non-empty experts. No per-token Python; no padding.
With model.moe_capacity_factor > 0 training drops, per expert, the pairs past its capacity with the
lowest weights, and counts them (evaluation and generation stay dropless, as transformers).

Tensor parallelism: every tensor rank holds every expert, split as a dense MLP is (gate/up by
columns with stride 2, down by rows). The router runs on the tokens as the rank holds them (a
sequence shard under sequence parallelism, with its weight's gradient summed over the tensor ranks
as a norm's); the tokens, their choices and their combine weights then enter the tensor region
together (copied, or all-gathered from the sequence shards), so no token is counted twice and the
partial expert outputs are summed (all-reduce, or reduce-scatter back to the shards).

Expert parallelism (parallel.expert = P > 1): each rank holds E / P whole experts (still split
over the tensor ranks as above). After the (token, choice) pairs are sorted by expert, the counts
per expert are exchanged over the expert group, the pairs travel to their experts' ranks by one
variable-split all-to-all (autograd: the gradients come back by the reverse one), are regrouped by
local expert, multiplied, and return the same way; the tokens' own rank weights and sums them as
without expert parallelism. Every tensor rank exchanges its own slice's pairs with the same tensor
rank of the other expert ranks, so no token is counted twice. The expert weights are marked for
DeepSpeed (allreduce=False, group_name="ep_size_P"): their gradients are summed over the ranks
holding the same experts only, and ZeRO partitions their states over those ranks.

Auxiliary losses never change the forward value: `_AttachAuxLoss` passes the hidden states through
and, in the backward pass, gives the auxiliary loss the gradient `aux_loss_scale` (set by the
trainer to what DeepSpeed gives the language-model loss: 1 / gradient accumulation steps), so they
reach the router at any pipeline stage without riding along the activations (Megatron-core's
MoEAuxLossAutoScaler). Their statistics are the micro batch's, whole: token counts are all-reduced
over the ranks that hold parts of the same sequences (the tensor ranks under sequence parallelism,
the context ranks), and each rank differentiates its own tokens' part, so the loss is the same at
every layout.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.parallel.checkpointing import recomputing
from megalm.parallel.context import TensorParallel
from megalm.parallel.layers import mark_replicated_param, mark_sharded, sequence_parallel_param, shard_tensor
from megalm.parallel.mappings import (
    copy_to_tensor_region,
    exchange_rows,
    gather_from_sequence_region,
    group_size,
    reduce_from_tensor_region,
    reduce_scatter_to_sequence_region,
)
from megalm.parallel.random import normal_init


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Whether block `layer` (0-based) has experts: MoE on, not listed in moe_dense_layers, and
    (layer + 1) divisible by moe_layer_freq (transformers' decoder_sparse_step / mlp_only_layers)."""
    return cfg.moe_num_experts > 0 and layer not in cfg.moe_dense_layers and (layer + 1) % cfg.moe_layer_freq == 0


# ----------------------------------------------------------------------------- grouped matmul


def _aligned(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm needs every stride (but the last) a multiple of 16 bytes."""
    return all(t.stride(i) * t.element_size() % 16 == 0 for t in tensors for i in range(t.dim() - 1))


def expert_group_name(size: int) -> str:
    """DeepSpeed's name for the expert groups of size `size` (deepspeed.utils.groups)."""
    return f"ep_size_{size}"


def mark_expert_parallel(param: nn.Parameter, size: int) -> None:
    """DeepSpeed's marks of an expert parameter split over `size` expert ranks (deepspeed.moe.utils
    is_moe_param): reduced over the ranks holding the same experts, in its own ZeRO group."""
    param.allreduce, param.group_name = False, expert_group_name(size)


def is_expert_parallel(param: torch.Tensor) -> bool:
    """Whether `param` is split over expert ranks (mark_expert_parallel)."""
    return getattr(param, "allreduce", True) is False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group (counts[e] rows for group e) times weight[e]^T: (N, in) x (E, out, in)
    -> (N, out). torch._grouped_mm where it exists for this device, dtype and alignment, else a
    loop over the groups that have rows."""
    w = weight.transpose(1, 2)  # (E, in, out), a view
    if hasattr(torch, "_grouped_mm") and x.dtype == w.dtype and x.size(0) > 0 and _aligned(x, weight):
        try:
            return torch._grouped_mm(x.contiguous(), w, offs=offsets)
        except (RuntimeError, NotImplementedError):  # this device/dtype has no kernel: the loop below
            pass
    pieces, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            pieces.append(x[start:start + n] @ w[e])
            start += n
    return torch.cat(pieces) if pieces else x[:0] @ w[0]  # no rows: the weight still gets its (zero) gradient


def _count(experts: torch.Tensor, n: int) -> torch.Tensor:
    """How many entries of `experts` name each of the n experts; a fixed shape (n,), unlike
    bincount's, so torch.compile needs no dynamic shape."""
    return torch.zeros(n, dtype=torch.long, device=experts.device).scatter_add_(0, experts, torch.ones_like(experts))


# ----------------------------------------------------------------------------- auxiliary losses


class _AttachAuxLoss(torch.autograd.Function):
    """forward: x unchanged; backward: x's gradient, and `scale` as the gradient of `aux`."""

    @staticmethod
    def forward(ctx, x, aux, scale):  # noqa: D102
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return x

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, torch.full(ctx.aux_shape, ctx.scale, device=grad.device, dtype=torch.float32), None


def _sum_over(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce (no gradient) of a statistic over the ranks that hold parts of the same sequences."""
    if group_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, group=group)
    return x


# ----------------------------------------------------------------------------- the layer


class GroupedExperts(nn.Module):
    """E SwiGLU experts: w1 = [gate; up] (E, 2I / p, H) split by columns with stride 2 over the tensor
    ranks, w2 (E, H, I / p) by rows. Names and layout are transformers 5.x's fused experts. Under
    expert parallelism P this rank holds experts [r E / P, (r + 1) E / P) of the same tensors
    (initialised whole, so every layout starts from the same model)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, generator: torch.Generator) -> None:
        super().__init__()
        e, h, i = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
        p, r = tp.size, tp.rank
        w1 = torch.empty(e, 2 * i, h)
        normal_init(cfg.init_std, generator)(w1)
        w2 = torch.empty(e, h, i)
        normal_init(cfg.init_std / math.sqrt(2 * cfg.num_layers), generator)(w2)
        ep, er = tp.expert_size, tp.expert_rank
        w1, w2 = shard_tensor(w1, 0, er, ep), shard_tensor(w2, 0, er, ep)
        self.w1 = nn.Parameter(shard_tensor(w1, 1, r, p, stride=2))
        self.w2 = nn.Parameter(shard_tensor(w2, 2, r, p))
        mark_sharded(self.w1, 1, 2)
        mark_sharded(self.w2, 2, 1)
        if ep > 1:
            mark_expert_parallel(self.w1, ep)
            mark_expert_parallel(self.w2, ep)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, H) sorted by expert, counts (E,) -> (N, H) partial over the tensor ranks."""
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = grouped_linear(x, self.w1, counts, offsets).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.w2, counts, offsets)


class MoE(nn.Module):
    """A block's feed-forward as a mixture of experts: y = sum_k w_k expert_{e_k}(x) (+ shared).

    `aux_loss_scale` is the gradient the auxiliary losses receive (the trainer sets it to the
    language-model loss's: 1 / gradient accumulation steps). `stats` accumulates, over the forward
    passes since the last `pop_stats`, the tokens per expert and the auxiliary losses' values.
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, generator: torch.Generator) -> None:
        super().__init__()
        from megalm.model.layers import MLP  # noqa: PLC0415 - layers builds MoE

        self.cfg, self.tp = cfg, tp
        self.num_experts, self.top_k = cfg.moe_num_experts, cfg.moe_top_k
        self.router = nn.Linear(cfg.hidden_size, self.num_experts, bias=False)
        normal_init(cfg.init_std, generator)(self.router.weight)
        mark_replicated_param(self.router.weight, tp.sequence_parallel)
        self.experts = GroupedExperts(cfg, tp, generator)
        self.shared = self.shared_gate = None
        if cfg.moe_shared_expert_size:
            self.shared = MLP(cfg, tp, generator, width=cfg.moe_shared_expert_size)
            if cfg.moe_shared_expert_gate:
                self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
                normal_init(cfg.init_std, generator)(self.shared_gate.weight)
                mark_replicated_param(self.shared_gate.weight, tp.sequence_parallel)
        # the ranks holding parts of the same sequences: their token counts make the micro batch's
        self.token_groups = [g for g in (tp.group if tp.sequence_parallel else None, tp.context) if g is not None]
        self.aux_loss_scale = 1.0
        # global-batch statistics (model.moe_aux_loss_statistics): the data-parallel group, the step's
        # running (counts per expert, tokens), and what each forward used, for its recomputation
        self.batch_group: dist.ProcessGroup | None = None
        self.step_statistics: torch.Tensor | None = None
        self.replay: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self.stats: dict[str, torch.Tensor] = {}
        self.bias_rate = cfg.moe_bias_update_rate
        if self.bias_rate > 0:  # DeepSeek-V3's auxiliary-loss-free balancing (update_expert_bias)
            # the bias in units of the rate: an integer, so no precision cast (bf16 modules) changes it
            self.register_buffer("expert_bias_steps", torch.zeros(self.num_experts, dtype=torch.long))
            self.register_buffer("step_counts", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
        self.layer_number = -1  # the block's, set by it (names the metrics)

    # ------------------------------------------------------------------ routing

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, H) -> fp32 router logits (T, E), chosen experts (T, k), their weights (T, k) fp32."""
        weight = sequence_parallel_param(self.router.weight, self.tp.group, self.tp.sequence_parallel)
        logits = F.linear(x.float(), weight.float())
        scores = logits.softmax(-1) if self.cfg.moe_score == "softmax" else logits.sigmoid()
        if self.bias_rate > 0:  # the expert bias changes which experts are chosen, not their weights
            chosen = (scores + self.bias_rate * self.expert_bias_steps.float()).topk(self.top_k, dim=-1).indices
            top = scores.gather(-1, chosen)
        else:
            top, chosen = scores.topk(self.top_k, dim=-1)
        if self.cfg.moe_norm_topk_prob:
            top = top / (top.sum(-1, keepdim=True) + (1e-20 if self.cfg.moe_score == "sigmoid" else 0.0))
        return logits, chosen, top * self.cfg.moe_router_scale

    def _aux_losses(self, logits: torch.Tensor, chosen: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """This rank's part of coeff * switch loss + z coeff * z-loss over the whole micro batch, and
        the statistics for the metrics. Switch loss: E / (k T^2) sum_e count_e * sum_t p_te, 1 at
        perfectly balanced routing (Megatron's convention; transformers' pools the layers and gives k)."""
        cfg, e, k = self.cfg, self.num_experts, self.top_k
        tokens = torch.tensor(float(logits.size(0)), device=logits.device)
        for g in self.token_groups:
            counts, tokens = _sum_over(counts, g), _sum_over(tokens, g)
        total = logits.new_zeros(())
        values = {}
        if cfg.moe_aux_loss_coeff > 0:
            probs = logits.softmax(-1) if cfg.moe_score == "softmax" else logits.sigmoid()
            if cfg.moe_score == "sigmoid":
                probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
            routed, seen = counts, tokens  # f_e = routed_e / seen
            if cfg.moe_aux_loss_statistics == "global_batch":
                routed, seen = self._global_batch(counts, tokens)
            part = (routed.float() * probs.sum(0)).sum() * (e / (k * tokens * seen.float()))
            total = total + cfg.moe_aux_loss_coeff * part
            values["aux_loss"] = part.detach()
        if cfg.moe_z_loss_coeff > 0:
            part = torch.logsumexp(logits, -1).square().sum() / tokens
            total = total + cfg.moe_z_loss_coeff * part
            values["z_loss"] = part.detach()
        if not recomputing():
            self._record(counts, values)
            if self.bias_rate > 0:
                self.step_counts += counts
        return total if values else None

    def _global_batch(self, counts: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's (counts per expert, tokens) so far over every data-parallel rank, this micro batch
        included; a recomputation gets what its forward got (in forward order: 1F1B recomputes in the
        order it ran the forwards)."""
        if recomputing():
            return self.replay.popleft()
        now = _sum_over(torch.cat([counts.double(), tokens.double().view(1)]), self.batch_group)
        self.step_statistics = now if self.step_statistics is None else self.step_statistics + now
        used = (self.step_statistics[:-1].clone(), self.step_statistics[-1].clone())
        if self.cfg.activation_checkpointing:
            self.replay.append(used)
        return used

    def _record(self, counts: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Add this forward's global counts and this rank's loss parts to `stats` (summed over the
        token groups when popped: each rank holds its tokens' part)."""
        new = {"tokens_per_expert": counts.detach().double(), "forwards": torch.ones((), dtype=torch.float64)}
        new.update({k: v.double() for k, v in values.items()})
        for key, v in new.items():
            self.stats[key] = self.stats[key] + v if key in self.stats else v

    def pop_stats(self) -> dict[str, torch.Tensor]:
        """The statistics since the last call (loss parts summed over the token groups), reset."""
        stats, self.stats = self.stats, {}
        for key in ("aux_loss", "z_loss"):
            if key in stats:
                for g in self.token_groups:
                    stats[key] = _sum_over(stats[key], g)
        for key in ("dropped", "routed"):  # the tensor ranks saw the same tokens, the context ranks their chunks
            if key in stats:
                stats[key] = _sum_over(stats[key], self.tp.context)
        return stats

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape  # s: the sequence shard under sequence parallelism
        logits, chosen, weights = self.route(x.reshape(-1, h))
        counts_local = _count(chosen.reshape(-1), self.num_experts)
        aux = self._aux_losses(logits, chosen, counts_local) if self.training and torch.is_grad_enabled() else None
        routed = self._experts(x, chosen.view(b, s, -1), weights.to(x.dtype).view(b, s, -1))
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                gate_w = sequence_parallel_param(self.shared_gate.weight, self.tp.group, self.tp.sequence_parallel)
                shared = torch.sigmoid(F.linear(x, gate_w)) * shared
            routed = routed + shared
        if aux is not None:
            routed = _AttachAuxLoss.apply(routed, aux, self.aux_loss_scale)
        return routed

    def _experts(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every tensor rank runs its slice of the experts on all the micro batch's tokens."""
        group, sp = self.tp.group, self.tp.sequence_parallel
        if sp:  # the shards' tokens, choices and weights, whole; backward: reduce-scatter
            x = gather_from_sequence_region(x, group, tensor_parallel_output_grad=True)
            weights = gather_from_sequence_region(weights, group, tensor_parallel_output_grad=True)
            chosen = gather_from_sequence_region(chosen, group, tensor_parallel_output_grad=False)
        else:  # the same tokens on every tensor rank; backward: sum the partial gradients
            x, weights = copy_to_tensor_region(x, group), copy_to_tensor_region(weights, group)
        b, s, h = x.shape
        tokens, k = x.reshape(-1, h), self.top_k
        flat = chosen.reshape(-1)
        if self.cfg.moe_capacity_factor > 0 and self.training:
            order, counts = self._within_capacity(flat, weights.reshape(-1).detach())
        else:  # dropless
            order = torch.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
            counts = _count(flat, self.num_experts)
        source = order // k
        if self.tp.expert is None:
            y = self.experts(tokens[source], counts)
        else:
            y = self._on_expert_ranks(tokens[source], counts)
        y = y * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(tokens).index_add(0, source, y.to(tokens.dtype)).view(b, s, h)
        if sp:
            return reduce_scatter_to_sequence_region(out, group)
        return reduce_from_tensor_region(out, group)

    def _on_expert_ranks(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert parallelism: x (N, H) sorted by expert, counts (E,) -> the experts' outputs (N, H)
        in the same order, computed on the ranks that hold the experts."""
        group, ranks = self.tp.expert, self.tp.expert_size
        local = self.num_experts // ranks
        sent = counts.view(ranks, local).contiguous()  # pairs for each rank's experts
        received = torch.empty_like(sent)  # received[s, e]: pairs from rank s for local expert e
        dist.all_to_all_single(received, sent, group=group)
        send, recv = sent.sum(1).tolist(), received.sum(1).tolist()
        x = exchange_rows(x, recv, send, group)  # by source rank, then local expert
        expert_of_row = torch.arange(local, device=x.device).repeat(ranks).repeat_interleave(received.reshape(-1))
        by_expert = torch.argsort(expert_of_row, stable=True)
        y = self.experts(x[by_expert], received.sum(0))
        y = y[torch.argsort(by_expert)]  # back to arrival order
        return exchange_rows(y, send, recv, group)

    def _within_capacity(self, flat: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (token, choice) pairs each expert keeps, grouped by expert, and the kept counts: an expert
        takes at most ceil(moe_capacity_factor x pairs / E) of the pairs the dispatch sees, those with
        the highest combine weights (Megatron's "probs" policy); the rest are dropped (their token
        keeps the residual and its other experts; the weights are not renormalised) and counted."""
        n, e = flat.numel(), self.num_experts
        capacity = math.ceil(self.cfg.moe_capacity_factor * n / e)
        best_first = torch.argsort(-scores, stable=True)
        order = best_first[torch.argsort(flat[best_first], stable=True)]  # by expert, best first within
        counts = _count(flat, e)
        rank = torch.arange(n, device=flat.device) - (counts.cumsum(0) - counts)[flat[order]]
        keep = rank < capacity
        if torch.is_grad_enabled() and not recomputing():
            dropped = (n - keep.sum()).double()
            for key, v in (("dropped", dropped), ("routed", torch.tensor(float(n), dtype=torch.float64))):
                self.stats[key] = self.stats[key] + v if key in self.stats else v
        return order[keep], counts.clamp(max=capacity)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, layer) of every MoE layer of a model (or a pipeline stage)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def moe_metrics(model: nn.Module, data_group: dist.ProcessGroup | None, world: bool = True) -> dict[str, float]:
    """The MoE layers' statistics since the last call, over every rank's micro batches, as metrics:
    per block N, `moe/N/load_max` (the busiest expert's tokens over the mean: 1 is balanced),
    `moe/N/load_min`, `moe/N/aux_loss` and `moe/N/z_loss` (per micro batch, before their
    coefficients), `moe/N/dropped` (the fraction of (token, choice) pairs over capacity),
    `moe/N/bias_norm` (the expert bias's L2 norm). Collective over the data group, then (`world`) every rank: pipeline stages hold
    different layers. Every rank must call it; all get the same dict."""
    out: dict[str, float] = {}
    for _, layer in moe_layers(model):
        stats = layer.pop_stats()
        if not stats:
            continue
        names = sorted(stats)
        packed = torch.cat([stats[k].reshape(-1) for k in names])
        if group_size(data_group) > 1:
            dist.all_reduce(packed, group=data_group)
        parts = dict(zip(names, packed.split([stats[k].numel() for k in names]), strict=True))
        counts, forwards = parts["tokens_per_expert"], parts["forwards"].item()
        n = layer.layer_number
        mean = counts.mean().clamp_min(1e-12)
        out[f"moe/{n}/load_max"] = (counts.max() / mean).item()
        out[f"moe/{n}/load_min"] = (counts.min() / mean).item()
        for key in ("aux_loss", "z_loss"):
            if key in parts:
                out[f"moe/{n}/{key}"] = parts[key].item() / forwards
        if "routed" in parts:
            out[f"moe/{n}/dropped"] = parts["dropped"].item() / parts["routed"].item()
        if layer.bias_rate > 0:
            out[f"moe/{n}/bias_norm"] = (layer.bias_rate * layer.expert_bias_steps.double()).norm().item()
    if world and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out)
        for d in gathered:
            out.update(d or {})
    return dict(sorted(out.items(), key=lambda kv: (int(kv[0].split("/")[1]), kv[0])))


def update_expert_bias(model: nn.Module, data_group: dist.ProcessGroup | None) -> None:
    """After an optimizer step: each MoE layer with an expert bias (model.moe_bias_update_rate) moves
    it by rate x sign(mean count - count) from the step's token counts over every data-parallel rank
    (the counts are already whole over the tensor and context ranks): busy experts become less
    likely to be chosen, idle ones more (DeepSeek-V3). Every rank of the data group must call it."""
    layers = [m for _, m in moe_layers(model) if m.bias_rate > 0]
    if not layers:
        return
    counts = torch.stack([m.step_counts for m in layers])  # (layers, E)
    if group_size(data_group) > 1:
        dist.all_reduce(counts, group=data_group)
    for layer, c in zip(layers, counts.double(), strict=True):
        layer.expert_bias_steps += torch.sign(c.mean() - c).long()
        layer.step_counts.zero_()


def set_batch_group(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """The data-parallel group whose micro batches global-batch statistics count (every MoE layer)."""
    for _, layer in moe_layers(model):
        layer.batch_group = group


def end_step_statistics(model: nn.Module) -> None:
    """After an optimizer step: the global-batch statistics start again (every MoE layer)."""
    for _, layer in moe_layers(model):
        layer.step_statistics = None
        layer.replay.clear()


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The gradient every MoE layer gives its auxiliary losses: the language-model loss's own scale."""
    for _, layer in moe_layers(model):
        layer.aux_loss_scale = scale

