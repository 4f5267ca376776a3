"""megalm's generation against transformers' on random (diverse-output) models; evaluate's numbers."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

PROMPTS = ["Once upon a time", "a", "def f(x):\n    return x + 1"]


def _random_hf_dir(arch, tmp_path):
    """A random byte-vocabulary HF model with the byte tokenizer, as to-hf would write it."""
    from megalm.convert.hf_tokenizer import export_tokenizer
    from megalm.data.tokenizer import ByteTokenizer

    special = dict(bos_token_id=None, eos_token_id=256, pad_token_id=256)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                       tie_word_embeddings=False, initializer_range=0.2, **special)
    else:
        cfg = transformers.GPT2Config(vocab_size=257, n_embd=64, n_layer=2, n_head=4, n_positions=96,
                                      initializer_range=0.2, **special)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / arch)
    export_tokenizer(ByteTokenizer(), tmp_path / arch)
    return tmp_path / arch


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_greedy_equals_hf_per_prompt(arch, tmp_path):
    from megalm.inference.generate import Sampling, generate
    from megalm.inference.load import load_from_hf

    hf_dir = _random_hf_dir(arch, tmp_path)
    model, codec = load_from_hf(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = [codec.encode(p) for p in PROMPTS]
    got = generate(model, ids, 30, Sampling(greedy=True), eod=256, pad=256).tokens
    for p, ours in zip(ids, got, strict=True):
        want = hf.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False, pad_token_id=256)[0, len(p):].tolist()
        want = want[: want.index(256) + 1] if 256 in want else want
        assert ours == want
    assert len({tuple(t) for t in got}) == 3 and len(set(got[0])) > 3  # diverse, not a degenerate repeat


def test_sampling_is_seeded_and_respects_top_k(tmp_path):
    from megalm.inference.generate import Sampling, generate, next_token
    from megalm.inference.load import load_from_hf

    model, codec = load_from_hf(_random_hf_dir("llama", tmp_path))
    ids = [codec.encode(p) for p in PROMPTS]
    s = Sampling(temperature=0.9, top_k=20, top_p=0.9, seed=7)
    a, b = (generate(model, ids, 20, s, eod=256, pad=256).tokens for _ in range(2))
    assert a == b and a != generate(model, ids, 20, Sampling(temperature=0.9, seed=8), eod=256, pad=256).tokens
    logits = torch.randn(4, 257)
    top2 = set(logits.topk(2).indices.flatten().tolist())
    g = torch.Generator().manual_seed(0)
    assert {int(t) for _ in range(50) for t in next_token(logits, Sampling(top_k=2), g)} <= top2
    assert torch.equal(next_token(logits, Sampling(top_p=1e-6), g), logits.argmax(-1))  # nucleus of one


class _Scripted(torch.nn.Module):
    """Predicts token 5 after any token but 5, and EOD (256) after 5; records what it was fed."""

    def __init__(self):
        super().__init__()
        self.cfg = type("Cfg", (), {"max_seq_len": 32})()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.fed = []

    def new_cache(self, batch, max_len):
        return None

    def logits_full(self, tokens, start_pos, cache):
        self.fed.append((start_pos, tokens.tolist()))
        logits = torch.zeros(*tokens.shape, 257)
        logits[..., 5] = (tokens != 5).float()
        logits[..., 256] = (tokens == 5).float()
        return logits


def test_ragged_prompts_and_stop_at_eod():
    from megalm.inference.generate import Sampling, generate

    model = _Scripted()
    out = generate(model, [[1, 2, 3], [4], [7, 5]], 10, Sampling(greedy=True), eod=256, pad=0).tokens
    assert out == [[5, 256], [5, 256], [256]]
    # the common prefix in one pass, then one position at a time with the longer prompts forced
    assert model.fed[0] == (0, [[1], [4], [7]])
    assert model.fed[1] == (1, [[2], [5], [5]]) and model.fed[2] == (2, [[3], [256], [256]])
    assert len(model.fed) == 4  # stops once every row has ended


def test_loss_and_perplexity_match_a_direct_computation(tmp_path):
    import numpy as np

    from megalm.inference.evaluate import loss_and_perplexity
    from megalm.inference.load import load_from_hf

    model, _ = load_from_hf(_random_hf_dir("gpt2", tmp_path))
    tokens = np.random.default_rng(0).integers(0, 257, 1000)
    r = loss_and_perplexity(model, tokens, seq_len=32, batch_size=5)
    data = torch.from_numpy(tokens[: 30 * 33]).view(30, 33)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(data[:, :-1], labels=data[:, :-1].clone()).loss  # HF shifts the labels itself
        logits = hf(data).logits[:, :-1]
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), data[:, 1:].reshape(-1)).item()
    assert r["windows"] == 30 and r["tokens"] == 30 * 32
    assert abs(r["loss"] - want) < 1e-5 and abs(r["perplexity"] - math.exp(want)) < 1e-3


def test_bleu_rouge():
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    from megalm.inference.evaluate import bleu_rouge

    same = bleu_rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["rouge1"] == pytest.approx(1.0)
    none = bleu_rouge(["dog"], ["the cat sat on the mat"])
    assert none["bleu"] < 1 and none["rougeL"] == 0.0
