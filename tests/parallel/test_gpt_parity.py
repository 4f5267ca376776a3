"""GPT with tensor parallelism (sizes 1, 2, 4; sequence parallel on/off; llama and gpt2; padded
vocab; GQA; the fused chunked loss and the unfused one; qk-norm, free head_dim, q/k/v biases, a window) equals the unsharded model computing all
logits then the loss: init exactly, logits, loss and every gradient within 1e-5.

Each rank builds the TP=1 reference (group None) with the same seed next to its shard, so one
launch per world size checks many configurations."""

import dataclasses

import torch
import torch.distributed as dist

from megalm.config import ModelConfig
from megalm.model import GPT
from megalm.parallel.context import TensorParallel
from megalm.parallel.layers import unshard_tensor
from megalm.parallel.vocab import strip_vocab_padding
from megalm.testing.distributed import run_distributed_test

TOL = 1e-5


def _cfg(arch: str, vocab: int, heads: int, kv_heads: int, **kw) -> ModelConfig:
    return ModelConfig(
        arch=arch, hidden_size=32 * heads // 4 if heads > 4 else 32, num_layers=2, num_heads=heads,
        num_kv_heads=kv_heads, ffn_hidden_size=64, vocab_size=vocab, max_seq_len=32, **kw,
    )


def _gather_full(t: torch.Tensor, param, group) -> torch.Tensor:
    """The whole parameter (or gradient) from every tensor rank's shard."""
    if not param.tensor_model_parallel or dist.get_world_size(group) == 1:
        return t
    shards = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, t.contiguous(), group=group)
    return unshard_tensor(shards, param.partition_dim, param.partition_stride)


def _strip(name: str, t: torch.Tensor, vocab: int) -> torch.Tensor:
    return strip_vocab_padding(t, vocab) if name in ("embedding.word.weight", "head.linear.weight") else t


def _compare(model: GPT, ref: GPT, group, vocab: int) -> dict:
    """Max |difference| of init (must be 0), and of gradients, over every parameter."""
    ref_params = dict(ref.named_parameters())
    init, grad, exact_zero_grad = 0.0, 0.0, True
    for name, p in model.named_parameters():
        r = ref_params[name]
        full = _strip(name, _gather_full(p.detach(), p, group), vocab)
        init = max(init, (full - _strip(name, r.detach(), vocab)).abs().max().item())
        g = _strip(name, _gather_full(p.grad, p, group), vocab)
        grad = max(grad, (g - _strip(name, r.grad, vocab)).abs().max().item())
        if name in ("embedding.word.weight", "head.linear.weight"):  # padding rows never learn
            exact_zero_grad &= bool((_gather_full(p.grad, p, group)[vocab:] == 0).all())
    return {"init": init, "grad": grad, "padding_grad_zero": exact_zero_grad}


def _one_case(cfg: ModelConfig, group, sequence_parallel: bool, seed: int = 11) -> dict:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    labels[0, :3] = -100
    unfused = dataclasses.replace(cfg, loss_chunk_tokens=0)
    model = GPT(cfg, TensorParallel.build(group, sequence_parallel=sequence_parallel, seed=seed))
    ref = GPT(unfused, TensorParallel.build(None, seed=seed))
    loss, ref_loss = model(tokens, labels), ref(tokens, labels)
    loss.backward()
    ref_loss.backward()
    with torch.no_grad():
        logits = (model.logits_full(tokens) - ref.logits_full(tokens)).abs().max().item()
    out = {"loss": abs(loss.item() - ref_loss.item()), "logits": logits, "loss_value": loss.item()}
    out.update(_compare(model, ref, group, cfg.vocab_size))
    return out


def _bf16_case(group) -> dict:
    """bf16 TP model against the fp32 TP=1 model (same weights, rounded to bf16)."""
    cfg = _cfg("llama", 1001, 4, 2)
    tokens = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(6))
    model = GPT(cfg, TensorParallel.build(group, sequence_parallel=True, seed=3)).to(torch.bfloat16)
    ref = GPT(cfg, TensorParallel.build(None, seed=3))
    with torch.no_grad():
        got = model.logits_full(tokens).float()
        expect = ref.logits_full(tokens)
    return {"bf16_logits": (got - expect).abs().max().item(), "logit_scale": expect.abs().max().item()}


def _dropout_case(group) -> dict:
    """Dropout 0.1 with sequence parallel: checkpointed blocks replay the same masks (two steps)."""
    grads, losses = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)  # the trainer seeds the default generator alike on the tensor ranks
        cfg = _cfg("llama", 1001, 4, 2, dropout=0.1, activation_checkpointing=ckpt)
        model = GPT(cfg, TensorParallel.build(group, sequence_parallel=True, seed=2))
        for step in range(2):
            model.zero_grad()
            tokens = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(step))
            loss = model(tokens, tokens)
            loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return {"loss_equal": losses[0] == losses[1], "grad": (grads[0] - grads[1]).abs().max().item()}


def _run_cases(cases: list) -> dict:
    group = dist.group.WORLD
    results = {}
    for name, (arch, vocab, heads, kv, sp, extra) in cases:
        results[name] = _one_case(_cfg(arch, vocab, heads, kv, **extra), group, sp)
    if dist.get_world_size() == 2:
        singles = [dist.new_group([r]) for r in range(2)]  # a real tensor group of one rank
        mine = singles[dist.get_rank()]
        results["tp1-real-group"] = _one_case(_cfg("llama", 1001, 4, 2), mine, False)
        results["bf16"] = _bf16_case(group)
        results["dropout"] = _dropout_case(group)
    return results


QWEN3 = {"family": "qwen3", "qk_norm": True, "head_dim": 12, "sliding_window": 6}
CASES_TP2 = [
    ("llama-v1001-gqa2", ("llama", 1001, 4, 2, False, {})),
    ("llama-v1001-gqa2-sp", ("llama", 1001, 4, 2, True, {})),
    ("llama-v1001-sp-chunk5", ("llama", 1001, 4, 2, True, {"loss_chunk_tokens": 5})),
    ("llama-v1001-unfused", ("llama", 1001, 4, 2, False, {"loss_chunk_tokens": 0})),
    ("llama-tied-ckpt-sp", ("llama", 1024, 4, 4, True, {"tie_embeddings": True, "activation_checkpointing": True})),
    ("gpt2-v1024-chunk7", ("gpt2", 1024, 4, 4, False, {"loss_chunk_tokens": 7})),
    ("gpt2-v1001-sp", ("gpt2", 1001, 4, 4, True, {})),
    # issue 22's features: qk-norm weights (replicated, each rank normalising its own heads: the
    # gradient is summed), a head_dim free of hidden / heads, q/k/v biases split by kv group, a window
    ("qwen3-qknorm-hd12-window6-sp", ("llama", 1001, 4, 2, True, QWEN3)),
    ("qwen3-qknorm-hd12-ckpt", ("llama", 1001, 4, 2, False, {**QWEN3, "activation_checkpointing": True})),
    ("qwen2-qkvbias-sp", ("llama", 1001, 4, 2, True, {"family": "qwen2", "qkv_bias": True})),
]
CASES_TP4 = [
    ("qwen3-qknorm-gqa4-sp", ("llama", 1001, 8, 4, True, QWEN3)),
    ("llama-v1001-gqa4", ("llama", 1001, 8, 4, False, {})),
    ("llama-v1001-gqa4-sp-chunk9", ("llama", 1001, 8, 4, True, {"loss_chunk_tokens": 9})),
    ("gpt2-v1001-sp", ("gpt2", 1001, 4, 4, True, {})),
]


def _assert_parity(results: list[dict]) -> None:
    for rank, per_case in enumerate(results):
        for name, r in per_case.items():
            if name in ("bf16", "dropout"):
                continue
            assert r["init"] == 0.0, (rank, name, r)
            assert r["padding_grad_zero"], (rank, name)
            for key in ("loss", "logits", "grad"):
                assert r[key] < TOL, (rank, name, key, r[key])
    losses = {name: {res[name]["loss_value"] for res in results} for name in results[0] if name not in ("bf16", "dropout")}
    assert all(len(v) == 1 for v in losses.values()), losses  # every tensor rank reports the same loss


def test_tensor_parallel_2_matches_unsharded():
    results = run_distributed_test(_run_cases, world_size=2, args=(CASES_TP2,))
    _assert_parity(results)
    for r in results:  # bf16 forward: within 0.1 absolute of fp32 on logits of magnitude ~1
        assert r["bf16"]["bf16_logits"] < 0.1, r["bf16"]
    assert results[0]["tp1-real-group"]["logits"] == 0.0  # a one-rank group is the unsharded model
    for r in results:  # the tensor-parallel dropout stream is replayed under recomputation
        assert r["dropout"]["loss_equal"] and r["dropout"]["grad"] < 1e-6, r["dropout"]


def test_tensor_parallel_4_matches_unsharded():
    results = run_distributed_test(_run_cases, world_size=4, args=(CASES_TP4,))
    _assert_parity(results)
