"""The mixture-of-experts layer (megalm.model.moe) against a per-token reference written here from
the published definitions: routing (softmax or sigmoid, top-k, renormalised or not, scaled), the
experts, a gated shared expert, the auxiliary losses' gradients, an expert that gets no token,
recomputation, and the grouped matmul against its loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalm.config import ModelConfig, validate_model
from megalm.errors import MegalmError
from megalm.model.gpt import GPT
from megalm.model.moe import MoE, grouped_linear, is_moe_layer, moe_layers
from megalm.parallel.context import TensorParallel


def small(**kw) -> ModelConfig:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=97, max_seq_len=32, moe_num_experts=4,
                moe_top_k=2, moe_ffn_hidden_size=16, ffn_hidden_size=16)
    return ModelConfig(**{**base, **kw})


def layer(cfg: ModelConfig) -> MoE:
    torch.manual_seed(0)
    moe = MoE(cfg, TensorParallel.build(None), torch.Generator().manual_seed(0))
    with torch.no_grad():  # the init's scale makes every score alike: spread them
        moe.router.weight.normal_(0, 1.0)
    return moe


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """y_t = sum over the k chosen experts e of w_te * W2_e (silu(G_e x_t) * U_e x_t) (+ shared), token by token."""
    cfg = moe.cfg
    out = torch.zeros_like(x)
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            xt = x[b, t]
            logits = moe.router.weight @ xt
            scores = logits.softmax(-1) if cfg.moe_score == "softmax" else logits.sigmoid()
            top, idx = scores.topk(cfg.moe_top_k)
            if cfg.moe_norm_topk_prob:
                top = top / top.sum()
            for w, e in zip(top * cfg.moe_router_scale, idx.tolist(), strict=True):
                gate, up = (moe.experts.w1[e] @ xt).chunk(2)
                out[b, t] += w * (moe.experts.w2[e] @ (F.silu(gate) * up))
            if moe.shared is not None:
                gate, up = (moe.shared.fc1.weight @ xt).chunk(2)
                s = moe.shared.fc2.weight @ (F.silu(gate) * up)
                if moe.shared_gate is not None:
                    s = torch.sigmoid(moe.shared_gate.weight @ xt) * s
                out[b, t] += s
    return out


@pytest.mark.parametrize("kw", [
    {}, {"moe_norm_topk_prob": False, "moe_top_k": 3},
    {"moe_score": "sigmoid", "moe_router_scale": 2.5},
    {"moe_shared_expert_size": 8, "moe_shared_expert_gate": True}, {"moe_top_k": 1},
])
def test_the_layer_equals_the_per_token_definition(kw):
    moe = layer(small(**kw))
    x = torch.randn(2, 7, 32, requires_grad=True)
    y, ref = moe(x), reference(moe, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *moe.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x, *moe.parameters()], g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_expert_that_gets_no_token_gets_a_zero_gradient_and_the_rest_are_right():
    moe = layer(small(moe_top_k=1))
    with torch.no_grad():
        moe.router.weight[3] = -100.0  # positive tokens: never the largest score
    x = torch.randn(2, 6, 32).abs()
    y = moe(x)
    torch.testing.assert_close(y, reference(moe, x), rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    assert moe.experts.w1.grad[3].abs().max() == 0 and moe.experts.w1.grad[:3].abs().max() > 0


def test_the_auxiliary_losses_reach_the_router_as_their_definitions_say():
    coeff, z = 0.3, 0.05
    moe = layer(small(moe_aux_loss_coeff=coeff, moe_z_loss_coeff=z))
    moe.train()
    x = torch.randn(3, 5, 32)
    r = torch.randn(3, 5, 32)
    (moe(x) * r).sum().backward()
    got = moe.router.weight.grad.clone()
    stats = moe.pop_stats()

    # reference: the language-model part plus coeff * switch + z * z-loss, written out
    moe.router.weight.grad = None
    moe.cfg.moe_aux_loss_coeff = moe.cfg.moe_z_loss_coeff = 0.0  # the layer adds nothing now
    logits = x.reshape(-1, 32) @ moe.router.weight.T
    probs = logits.softmax(-1)
    counts = torch.bincount(probs.topk(2).indices.reshape(-1), minlength=4).float()
    t = logits.size(0)
    switch = 4 / (2 * t) * (counts * probs.mean(0)).sum()  # E/k sum_e f_e p_e: 1 when balanced
    zloss = torch.logsumexp(logits, -1).square().mean()
    ((moe(x) * r).sum() + coeff * switch + z * zloss).backward()
    torch.testing.assert_close(got, moe.router.weight.grad, rtol=1e-5, atol=1e-7)
    assert (got - moe.router.weight.grad).abs().max() < 1e-3 * got.abs().max()

    assert stats["tokens_per_expert"].sum() == 2 * t and abs(stats["aux_loss"].item() - switch.item()) < 1e-5
    assert abs(stats["z_loss"].item() - zloss.item()) < 1e-4


def test_global_batch_statistics_count_the_steps_micro_batches_so_far():
    # model.moe_aux_loss_statistics=global_batch: the second micro batch's switch loss takes f_e from
    # both micro batches' tokens (one process: the data-parallel group is this rank); a new step starts over
    from megalm.model.moe import end_step_statistics

    moe = layer(small(moe_aux_loss_coeff=1.0, moe_aux_loss_statistics="global_batch"))
    moe.train()
    x1, x2 = torch.randn(2, 5, 32), torch.randn(3, 4, 32)
    logits1, logits2 = (x.reshape(-1, 32) @ moe.router.weight.T for x in (x1, x2))
    counts1, counts2 = (torch.bincount(lg.softmax(-1).topk(2).indices.reshape(-1), minlength=4).float()
                        for lg in (logits1, logits2))
    moe(x1)
    moe.router.weight.grad = None
    (moe(x2) * 0).sum().backward()  # the second micro batch's auxiliary loss alone
    got = moe.router.weight.grad.clone()
    f = (counts1 + counts2) / (logits1.size(0) + logits2.size(0))  # the step's tokens so far
    expected = torch.autograd.grad(4 / 2 * (f * logits2.softmax(-1).mean(0)).sum(), moe.router.weight,
                                   retain_graph=True)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    micro = torch.autograd.grad(4 / 2 * (counts2 / logits2.size(0) * logits2.softmax(-1).mean(0)).sum(),
                                moe.router.weight)[0]
    assert (got - micro).abs().max() > 1e-3 * got.abs().max()  # not the micro batch's own statistics
    end_step_statistics(moe)
    moe.router.weight.grad = None
    (moe(x2) * 0).sum().backward()  # a new step: its first micro batch alone
    torch.testing.assert_close(moe.router.weight.grad, micro, rtol=1e-5, atol=1e-8)


def _global_batch_rank() -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's router gradient from the switch loss alone, global-batch statistics over both ranks."""
    import torch.distributed as dist

    from megalm.model.moe import set_batch_group

    moe = layer(small(moe_aux_loss_coeff=1.0, moe_aux_loss_statistics="global_batch"))
    moe.train()
    set_batch_group(moe, dist.new_group([0, 1]))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(10 + dist.get_rank()))
    (moe(x) * 0).sum().backward()
    return moe.router.weight.grad, x


def test_global_batch_statistics_count_every_data_parallel_ranks_tokens():
    from megalm.testing.distributed import run_distributed_test

    (g0, x0), (g1, x1) = run_distributed_test(_global_batch_rank, 2)
    moe = layer(small())
    logits = [x.reshape(-1, 32) @ moe.router.weight.T for x in (x0, x1)]
    counts = sum(torch.bincount(lg.softmax(-1).topk(2).indices.reshape(-1), minlength=4).float() for lg in logits)
    f = counts / 20  # both ranks' 10 tokens
    for g, lg in zip((g0, g1), logits, strict=True):
        expected = torch.autograd.grad(4 / 2 * (f * lg.softmax(-1).mean(0)).sum(), moe.router.weight, retain_graph=True)[0]
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-8)


def test_global_batch_statistics_replay_in_the_recomputation():
    batches = torch.randint(0, 97, (2, 2, 16), generator=torch.Generator().manual_seed(3))
    grads = []
    for recompute in (False, True):
        cfg = small(moe_aux_loss_coeff=0.1, moe_aux_loss_statistics="global_batch", activation_checkpointing=recompute)
        model = GPT(cfg, TensorParallel.build(None))
        model.train()
        losses = [model(tokens, tokens) for tokens in batches]  # two forwards, then their backwards (as 1F1B)
        for loss in losses:
            loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert all(not m.replay for _, m in moe_layers(model))  # every recomputation took what its forward used
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])


def test_the_aux_loss_scale_is_the_gradient_the_losses_get():
    moe = layer(small(moe_aux_loss_coeff=1.0))
    moe.train()
    x = torch.randn(2, 5, 32)
    grads = []
    for scale in (1.0, 0.25):
        moe.aux_loss_scale = scale
        moe.router.weight.grad = None
        (moe(x) * 0).sum().backward()  # only the auxiliary loss has a gradient
        grads.append(moe.router.weight.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], 0.25 * grads[0])


def test_recomputation_routes_the_same_and_counts_once():
    cfg = small(moe_aux_loss_coeff=0.1)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    grads, stats = [], []
    for recompute in (False, True):
        model = GPT(small(moe_aux_loss_coeff=0.1, activation_checkpointing=recompute), TensorParallel.build(None))
        model.train()
        model(tokens, tokens).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        stats.append([m.pop_stats()["tokens_per_expert"] for _, m in moe_layers(model)])
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])
    assert all(torch.equal(a, b) for a, b in zip(*stats, strict=True))
    assert stats[1][0].sum() == cfg.moe_top_k * tokens.numel()


def test_grouped_matmul_equals_its_loop():
    x = torch.randn(10, 16)
    w = torch.randn(3, 8, 16)
    counts = torch.tensor([4, 0, 6])
    offsets = counts.cumsum(0).to(torch.int32)
    loop = torch.cat([x[:4] @ w[0].T, x[4:] @ w[2].T])
    torch.testing.assert_close(grouped_linear(x, w, counts, offsets), loop)
    odd = torch.randn(10, 5)  # unaligned: the loop
    wo = torch.randn(3, 7, 5)
    torch.testing.assert_close(grouped_linear(odd, wo, counts, offsets), torch.cat([odd[:4] @ wo[0].T, odd[4:] @ wo[2].T]))


def test_which_layers_are_moe():
    cfg = small(num_layers=6, moe_layer_freq=2, moe_dense_layers=[3])
    assert [is_moe_layer(cfg, i) for i in range(6)] == [False, True, False, False, False, True]
    assert not any(is_moe_layer(small(moe_num_experts=0), i) for i in range(2))


@pytest.mark.parametrize(("kw", "message"), [
    ({"moe_top_k": 5}, "model.moe_top_k (5) must be in 1..model.moe_num_experts (4)"),
    ({"moe_dense_layers": [2]}, "model.moe_dense_layers [2] outside the model's blocks 0..1"),
    ({"moe_shared_expert_gate": True}, "model.moe_shared_expert_gate needs model.moe_shared_expert_size > 0"),
    ({"moe_num_experts": -1}, "model.moe_num_experts must be >= 0"),
    ({"family": "mixtral", "moe_norm_topk_prob": False}, "MixtralForCausalLM cannot hold model.moe_norm_topk_prob=false"),
    ({"family": "qwen3_moe"}, "Qwen3MoeForCausalLM cannot hold model.qk_norm=false"),
])
def test_bad_moe_settings_are_one_line(kw, message):
    with pytest.raises(MegalmError) as e:
        validate_model(small(**{"family": "mixtral", **kw}))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_expert_widths_must_divide_by_the_tensor_size():
    from megalm.config import load_config
    from megalm.testing.runs import TINY

    cfg = load_config(TINY, ["model.moe_num_experts=4", "model.family=qwen3_moe", "model.qk_norm=true",
                             "model.moe_ffn_hidden_size=175", "parallel.tensor=2"])
    with pytest.raises(MegalmError) as e:
        cfg.validate(world_size=2)
    assert str(e.value) == "model.moe_ffn_hidden_size (175) must divide by parallel.tensor (2)"


def test_a_model_no_family_holds_trains_as_family_none_and_to_hf_refuses_it(tmp_path):
    from megalm.convert.hf import save_hf
    from megalm.data.tokenizer import ByteTokenizer

    with pytest.raises(MegalmError) as e:  # sigmoid scores: no transformers class here has them
        validate_model(small(moe_score="sigmoid", family="mixtral"))
    assert "no family holds this model; change model.moe_score, or set model.family=none" in str(e.value)
    cfg = small(moe_score="sigmoid", family="none", vocab_size=257)
    validate_model(cfg)
    model = GPT(cfg, TensorParallel.build(None))
    with pytest.raises(MegalmError, match="model.family=none: this model has no Hugging Face class"):
        save_hf(model.state_dict(), cfg, ByteTokenizer(), tmp_path / "hf")
    assert not any(tmp_path.iterdir())  # nothing written


def test_parameter_counts_total_and_active():
    from megalm.model.flops import count_module_parameters, count_parameters

    cfg = small(num_layers=3, moe_dense_layers=[0], moe_shared_expert_size=8, moe_shared_expert_gate=True,
                family="qwen2_moe", qkv_bias=True, vocab_size=128)
    model = GPT(cfg, TensorParallel.build(None))
    assert count_module_parameters(model) == count_parameters(cfg)  # every expert, router and shared gate
    per_block_inactive = 3 * 32 * 16 * (4 - 2)  # E - k experts of 3 d f_e each
    assert count_parameters(cfg) - count_parameters(cfg, active=True) == 2 * per_block_inactive


def test_capacity_drops_the_lowest_weights_past_each_experts_capacity_and_counts_them():
    moe = layer(small(moe_capacity_factor=0.5))
    moe.train()
    x = torch.randn(2, 8, 32)
    y = moe(x)  # 16 tokens x 2 choices = 32 pairs; capacity ceil(0.5 x 32 / 4) = 4 per expert
    # reference: per expert, the 4 pairs with the highest weights, by the per-token definition
    _, chosen, weights = moe.route(x.reshape(-1, 32))
    keep = torch.zeros_like(weights, dtype=torch.bool)
    for e in range(4):
        pairs = (chosen == e).nonzero().tolist()
        pairs.sort(key=lambda p: -weights[p[0], p[1]].item())
        for t, j in pairs[:4]:
            keep[t, j] = True
    ref = torch.zeros(16, 32)
    for t in range(16):
        for j in range(2):
            if keep[t, j]:
                e, xt = chosen[t, j].item(), x.reshape(-1, 32)[t]
                gate, up = (moe.experts.w1[e] @ xt).chunk(2)
                ref[t] += weights[t, j] * (moe.experts.w2[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(y.reshape(-1, 32), ref, rtol=1e-5, atol=1e-6)
    assert (~keep).sum() > 0  # it did drop
    stats = moe.pop_stats()
    assert stats["dropped"].item() == (~keep).sum().item() and stats["routed"].item() == 32
    moe.eval()  # evaluation is dropless
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-5, atol=1e-6)


def test_the_expert_bias_chooses_experts_without_weighting_them_and_moves_against_the_load():
    from megalm.model.moe import update_expert_bias

    moe = layer(small(moe_bias_update_rate=0.5, family="none"))
    moe.train()
    x = torch.randn(2, 6, 32)
    logits, chosen, weights = moe.route(x.reshape(-1, 32))
    scores = logits.softmax(-1)
    moe.expert_bias_steps[3] = 100  # + 50 on expert 3's score: every token picks it
    _, biased, biased_w = moe.route(x.reshape(-1, 32))
    assert (biased == 3).any(-1).all() and not (chosen == 3).any(-1).all()
    top = scores.gather(-1, biased)  # the weights are the unbiased scores, renormalised
    torch.testing.assert_close(biased_w, top / top.sum(-1, keepdim=True))
    moe.expert_bias_steps.zero_()
    moe(x).sum().backward()
    counts = moe.step_counts.clone()
    assert counts.sum() == 2 * 12
    update_expert_bias(moe, None)
    expected = torch.sign(counts.double().mean() - counts.double()).long()
    assert torch.equal(moe.expert_bias_steps, expected) and moe.step_counts.sum() == 0
    assert "expert_bias_steps" in moe.state_dict() and "step_counts" not in moe.state_dict()
