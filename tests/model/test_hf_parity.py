"""megalm's GPT (tensor size 1) equals Hugging Face's Llama and GPT-2 given the same weights."""

import pytest
import torch

from megalm.config import ModelConfig
from megalm.convert.hf_names import decoder_from_hf, gpt2_from_hf, split_qkv
from megalm.model import GPT
from megalm.parallel.context import TensorParallel

transformers = pytest.importorskip("transformers")

VOCAB = 1001


def _llama_pair(tie: bool, kv_heads: int):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=tie, attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    cfg = ModelConfig(
        arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
        ffn_hidden_size=96, vocab_size=VOCAB, max_seq_len=64, norm_eps=1e-6, rope_theta=500000.0,
        tie_embeddings=tie,
    )
    ours = GPT(cfg, TensorParallel.build(None, seed=3)).eval()
    state = hf.state_dict()
    ours.load_state_dict(decoder_from_hf(state, cfg, ours.padded_vocab_size), strict=True)
    return hf, ours


def _gpt2_pair():
    hf_cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    cfg = ModelConfig(
        arch="gpt2", hidden_size=64, num_layers=2, num_heads=4, vocab_size=VOCAB, max_seq_len=64,
    )
    ours = GPT(cfg, TensorParallel.build(None, seed=3)).eval()
    ours.load_state_dict(gpt2_from_hf(hf.state_dict(), cfg, ours.padded_vocab_size), strict=True)
    return hf, ours


CASES = {
    "llama-gqa-untied": lambda: _llama_pair(tie=False, kv_heads=2),
    "llama-mqa-tied": lambda: _llama_pair(tie=True, kv_heads=1),
    "llama-mha": lambda: _llama_pair(tie=False, kv_heads=4),
    "gpt2": _gpt2_pair,
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_hugging_face(case):
    hf, ours = CASES[case]()
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours.logits_full(tokens)
        loss = ours(tokens[:, :-1], tokens[:, 1:])
    assert got.shape == expected.shape == (2, 40, VOCAB)
    assert (got - expected).abs().max().item() < 1e-5
    hf_loss = torch.nn.functional.cross_entropy(expected[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    assert abs(loss.item() - hf_loss.item()) < 1e-5


def test_qkv_fuse_split_roundtrip():
    q, k, v = torch.randn(8 * 4, 3), torch.randn(2 * 4, 3), torch.randn(2 * 4, 3)
    from megalm.convert.hf_names import fuse_qkv

    fused = fuse_qkv(q, k, v, num_heads=8, num_kv_heads=2)
    assert fused.shape == (48, 3)
    assert torch.equal(fused[:16], q[:16]) and torch.equal(fused[16:20], k[:4]) and torch.equal(fused[20:24], v[:4])
    for a, b in zip(split_qkv(fused, 8, 2), (q, k, v), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gpt2"])
def test_document_masked_model_scores_one_document_as_hugging_face(case):
    # a model trained with model.document_mask exports to a plain causal HF model: for a single
    # document, the masked attention (positions restarting or not) is exactly causal attention
    import dataclasses

    from megalm.model.gpt import GPT

    hf, plain = CASES[case]()
    for reset in (False, True):
        cfg = dataclasses.replace(plain.cfg, document_mask=True, document_positions=reset)
        ours = GPT(cfg, TensorParallel.build(None, seed=3)).eval()
        ours.load_state_dict(plain.state_dict())
        tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = hf(tokens).logits
            got = ours(tokens, positions=torch.arange(40).expand(2, 40), documents=torch.zeros(2, 40, dtype=torch.long))
        got = got[..., :VOCAB]
        assert (got - expected).abs().max().item() < 1e-5
        two_docs = torch.zeros(2, 40, dtype=torch.long)
        two_docs[:, 20:] = 1  # the mask is applied: a second document does not see the first
        with torch.no_grad():
            split = ours(tokens, positions=torch.arange(40).expand(2, 40), documents=two_docs)[..., :VOCAB]
        assert (split[:, :20] - expected[:, :20]).abs().max().item() < 1e-5
        assert (split[:, 20:] - expected[:, 20:]).abs().max().item() > 1e-3
