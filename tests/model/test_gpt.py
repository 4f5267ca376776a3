"""The single-process model: stage modules built alone, chaining, KV-cache generation, bf16,
activation checkpointing, dropout and configuration errors."""

import pytest
import torch

from megalm.config import ModelConfig
from megalm.errors import MegalmError
from megalm.model import GPT, PIPELINE_LAYERS, Block, Embedding, FinalNorm, Head
from megalm.parallel.context import TensorParallel
from megalm.parallel.loss import GPTLoss


def _cfg(arch="llama", **kw):
    base = dict(arch=arch, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2 if arch == "llama" else 4,
                vocab_size=300, max_seq_len=48)
    base.update(kw)
    return ModelConfig(**base)


def _tp(seed=1234):
    return TensorParallel.build(None, seed=seed)


def _tokens(b=2, s=20, vocab=300, seed=0):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stages_built_alone_have_the_full_models_weights_and_chain(arch):
    cfg = _cfg(arch, tie_embeddings=False)
    tp = TensorParallel.build(None, seed=9)
    model = GPT(cfg, tp)
    stages = [Embedding(cfg, tp)] + [Block(cfg, i, tp) for i in range(cfg.num_layers)]
    stages += [FinalNorm(cfg, tp), Head(cfg, tp)]
    block2 = Block(cfg, 2, tp)  # only layer 2, as a pipeline stage would build it
    for (name, p), (_, q) in zip(model.blocks[2].named_parameters(), block2.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    full = [model.embedding, *model.blocks, model.final_norm, model.head]
    for ours, alone in zip(full, stages, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), alone.parameters(), strict=True))
    tokens = _tokens()
    h = tokens
    for stage in stages:  # one tensor in, one tensor out: what a PipelineModule chains
        h = stage(h)
    assert torch.equal(h, model(tokens))
    labels = _tokens(seed=1)
    assert torch.equal(GPTLoss(cfg, tp)(h, labels), model(tokens, labels))


def test_pipeline_layer_order_is_the_models_module_order():
    from megalm.parallel.pipeline import gpt_name

    for tie in (False, True):
        names = [n for n, _ in GPT(_cfg(tie_embeddings=tie), _tp()).named_children()]
        assert names == list(PIPELINE_LAYERS[:3]) + ([] if tie else ["head"])
    # pipeline layer index -> GPT name, as the checkpoint reader and writer map them (3 blocks)
    assert [gpt_name(f"{i}.w", 3) for i in range(6)] == [
        "embedding.w", "blocks.0.w", "blocks.1.w", "blocks.2.w", "final_norm.w", "head.w"]
    assert gpt_name("tied_modules.embed.word.weight", 3) == "embedding.word.weight"


def test_seed_changes_and_reproduces_init():
    cfg = _cfg()
    a, b, c = GPT(cfg, _tp(1)), GPT(cfg, _tp(1)), GPT(cfg, _tp(2))
    assert torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, a.blocks[1].attn.qkv.weight)
    # init_std for inputs, init_std / sqrt(2 L) for output projections
    big = GPT(_cfg(hidden_size=256, num_heads=4, num_kv_heads=4, ffn_hidden_size=512, num_layers=8), _tp(0))
    assert abs(big.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(big.blocks[0].mlp.fc2.weight.std().item() - 0.02 / 4) < 3e-4
    assert torch.count_nonzero(big.embedding.word.weight[300:]) == 0  # vocabulary padding


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_generation_equals_full_recompute(arch):
    model = GPT(_cfg(arch), _tp(4)).eval()
    prompt = _tokens(b=2, s=7)
    cache = model.new_cache(batch=2, max_len=30)
    seq = prompt
    logits = model.logits_full(prompt[:, :4], cache=cache)  # prefill in two chunks:
    logits = model.logits_full(prompt[:, 4:], start_pos=4, cache=cache)  # queries at 4.. see 0..
    pos = prompt.size(1)
    for _ in range(10):
        step = logits[:, -1].argmax(-1, keepdim=True)
        full = model.logits_full(torch.cat([seq, step], dim=1))  # recompute from scratch
        seq = torch.cat([seq, step], dim=1)
        logits = model.logits_full(step, start_pos=pos, cache=cache)
        pos += 1
        assert (logits[:, -1] - full[:, -1]).abs().max().item() < 1e-5
    assert seq.shape == (2, 17)


def test_bf16_forward_close_to_fp32():
    cfg = _cfg()
    fp32 = GPT(cfg, _tp(5))
    bf16 = GPT(cfg, _tp(5)).to(torch.bfloat16)
    tokens = _tokens()
    with torch.no_grad():
        diff = (bf16.logits_full(tokens).float() - fp32.logits_full(tokens)).abs().max().item()
        loss_diff = abs(bf16(tokens, _tokens(seed=2)).item() - fp32(tokens, _tokens(seed=2)).item())
    assert diff < 0.05 and loss_diff < 0.01  # stated bf16 tolerance (logits are O(0.5) here)


def _train_grads(cfg, seed=0):
    torch.manual_seed(seed)
    model = GPT(cfg, _tp(7)).train()
    losses = []
    for step in range(2):  # two steps: the dropout streams must continue identically
        model.zero_grad()
        loss = model(_tokens(seed=step), _tokens(seed=10 + step))
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_identical_gradients(dropout):
    plain_losses, plain = _train_grads(_cfg(dropout=dropout))
    ckpt_losses, ckpt = _train_grads(_cfg(dropout=dropout, activation_checkpointing=True))
    assert plain_losses == ckpt_losses
    for name, g in plain.items():
        assert torch.allclose(g, ckpt[name], atol=1e-7, rtol=0), name


def test_dropout_is_active_in_training_only():
    model = GPT(_cfg(dropout=0.5), _tp(1))
    tokens = _tokens()
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(tokens), model(tokens))
        model.train()
        assert not torch.equal(model(tokens), model(tokens))


def test_errors_name_the_fix():
    bare = ModelConfig(hidden_size=32, num_heads=4, vocab_size=100)  # derived values filled on construction
    assert (bare.num_kv_heads, bare.ffn_hidden_size, bare.tie_embeddings) == (4, 256, False)
    assert GPT(bare, _tp()).blocks[0].mlp.fc1.weight.shape == (2 * 256, 32)
    model = GPT(_cfg(arch="gpt2", max_seq_len=16), _tp(0))
    with pytest.raises(MegalmError, match="max_seq_len"):
        model(_tokens(s=20))
    with pytest.raises(MegalmError, match="KV cache holds 8"):
        model.logits_full(_tokens(s=10), cache=model.new_cache(2, 8))


def test_blocks_reading_the_rope_table_equal_blocks_computing_rope():
    # the model's cos/sin buffers (read by every block) against rope_cos_sin per block: whole
    # sequences, restarted document positions, a KV-cache offset; the buffers stay out of the weights
    from megalm.model.documents import Packing
    from megalm.model.rope import rope_cos_sin

    cfg = _cfg()
    model = GPT(cfg, _tp()).eval()
    assert "rope_cos" not in model.state_dict() and model.rope_cos.shape == (48, 8)
    h = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(1))
    restarts = torch.cat([torch.arange(7), torch.arange(13)]).expand(2, 20)
    table = (model.rope_cos, model.rope_sin)
    for positions, start in [(None, 0), (restarts, 0), (None, 11), (None, 40)]:  # 40 + 20 > 48: computed
        read = model.blocks[0](h, Packing(positions, start_pos=start, rope=table))
        computed = model.blocks[0](h, Packing(positions, start_pos=start))
        assert torch.equal(read, computed)
    cos, sin = rope_cos_sin(restarts, cfg, 8)
    assert torch.equal(model.rope_cos[restarts], cos) and torch.equal(model.rope_sin[restarts], sin)
    out = model(_tokens())
    model.rope_cos.mul_(-1)  # a wrong table changes the output: the blocks do read it
    assert not torch.allclose(model(_tokens()), out)
