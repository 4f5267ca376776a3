"""Attention inside documents: a packed sample trains exactly as its documents run one by one.

Fast, single process, fp32: the losses and gradients of a packed batch equal those of each
document run alone (llama and gpt2, fused and unfused loss); the FlexAttention block mask (the GPU
path) equals the dense mask (the CPU path); batches carry the right document ids and positions,
chunked for context parallelism; bad input is one line.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from megalm.config import ModelConfig, load_config
from megalm.data.packing import Collate, document_ids, document_positions
from megalm.errors import MegalmError
from megalm.model import GPT
from megalm.model.documents import document_block_mask, document_dense_mask
from megalm.parallel.context import TensorParallel
from megalm.testing.runs import TINY
from megalm.training.data import check_documents_end_with_eod

EOD = 299


def _model(arch: str, loss_chunk: int, reset: bool) -> GPT:
    cfg = ModelConfig(arch=arch, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2 if arch == "llama" else 4,
                      vocab_size=300, max_seq_len=64, document_mask=True, document_positions=reset,
                      loss_chunk_tokens=loss_chunk)
    return GPT(cfg, TensorParallel.build(None, seed=7))


def _packed_sample(lengths: list[int], seed: int) -> torch.Tensor:
    """Documents of `lengths` tokens (each ending with EOD), concatenated, plus one more token."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        doc = torch.randint(0, EOD, (n,), generator=g)
        doc[-1] = EOD
        docs.append(doc)
    docs.append(torch.randint(0, EOD, (1,), generator=g))
    return torch.cat(docs)


@pytest.mark.parametrize("arch, loss_chunk, reset", [
    ("llama", 0, True), ("llama", 7, True), ("gpt2", 7, True), ("gpt2", 0, True),
    ("llama", 7, False),  # RoPE is relative: positions need not restart for llama
])
def test_packed_batch_equals_documents_run_alone(arch, loss_chunk, reset):
    lengths = [[9, 20, 3, 16, 16], [31, 33]]
    samples = [_packed_sample(n, seed) for seed, n in enumerate(lengths)]  # 64 + 1 tokens each
    inputs, labels = Collate(eod=EOD, document_positions=reset)([s.numpy() for s in samples])
    tokens, positions, documents = inputs
    model = _model(arch, loss_chunk, reset)

    packed = model(tokens, labels, positions=positions, documents=documents)
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total = torch.zeros(())  # the same mean, one document at a time
    for row, doc_lengths in enumerate(lengths):
        start = 0
        for n in doc_lengths:
            piece = slice(start, start + n)
            pos = torch.arange(n) if reset else torch.arange(start, start + n)
            loss = model(tokens[row:row + 1, piece], labels[row:row + 1, piece], positions=pos)
            total = total + loss * n / labels.numel()
            start += n
    total.backward()
    torch.testing.assert_close(packed, total, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():  # fp32: within 1e-5 of the largest gradient entry
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)

    unmasked = model(tokens, labels)  # the mask changes the loss: the test can fail
    assert abs(unmasked.item() - packed.item()) > 1e-4


@pytest.mark.parametrize("window", [0, 70])
@pytest.mark.parametrize("seq, block", [(300, 128), (256, 64), (50, 16), (128, 128)])
def test_flex_block_mask_equals_the_dense_mask(seq, block, window):
    # with a sliding window (Mistral) as well as documents: the same tiles and the same attention
    g = torch.Generator().manual_seed(seq)
    documents = torch.zeros(3, seq, dtype=torch.int64)
    for cut in torch.randint(1, seq, (7,), generator=g).tolist():
        documents[0, cut:] += 1
    documents[1, seq // 2:] = 1  # row 2: one document
    q = torch.randn(3, 4, seq, 16, generator=g)
    k, v = torch.randn(3, 2, seq, 16, generator=g), torch.randn(3, 2, seq, 16, generator=g)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=document_dense_mask(documents, window), enable_gqa=True)
    mask = document_block_mask(documents, window, block=block)
    with warnings.catch_warnings():  # uncompiled FlexAttention warns that it is the reference path
        warnings.simplefilter("ignore", UserWarning)
        flex = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    tiles = -(-seq // block)
    assert mask.kv_num_blocks.shape == (3, 1, tiles)
    if seq >= 4 * block:  # tiles between different documents are skipped: sparser than causal alone
        causal = document_block_mask(torch.zeros_like(documents), window, block=block)
        assert mask.sparsity() > causal.sparsity() > 0
    if seq % block == 0:  # each tile as the dense mask has it: all pairs allowed (full), some, none
        allowed = document_dense_mask(documents, window).reshape(3, tiles, block, tiles, block)
        full, some = allowed.all(4).all(2), allowed.any(4).any(2)
        assert torch.equal(mask.full_kv_num_blocks[:, 0], full.sum(-1, dtype=torch.int32))
        assert torch.equal(mask.kv_num_blocks[:, 0], (some & ~full).sum(-1, dtype=torch.int32))
        for b in range(3):
            for t in range(tiles):
                n = int(mask.full_kv_num_blocks[b, 0, t])
                assert set(mask.full_kv_indices[b, 0, t, :n].tolist()) == set(full[b, t].nonzero().flatten().tolist())
        if window and block < window:  # the window leaves tiles out that causality alone keeps
            no_window = document_dense_mask(documents).reshape(3, tiles, block, tiles, block).any(4).any(2)
            assert some.sum() < no_window.sum()
        if tiles > 2 and not window:  # two documents: fewer full tiles than one document has
            assert full[1].sum() < full[2].sum()


def test_document_ids_and_positions():
    tokens = np.array([[5, 6, EOD, 7, EOD, EOD, 8, 9]])
    assert document_ids(tokens, EOD).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert document_positions(document_ids(tokens, EOD)).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("reset", [False, True])
def test_context_chunks_reassemble_the_batch(reset):
    samples = [_packed_sample([9, 20, 3, 16, 16], 0).numpy(), _packed_sample([31, 33], 1).numpy()]
    (tokens, positions, documents), labels = Collate(eod=EOD, document_positions=reset)(samples)
    chunks = [Collate(eod=EOD, document_positions=reset, context_rank=r, context_size=4)(samples) for r in range(4)]
    assert torch.equal(torch.cat([c[0][0] for c in chunks], 1), tokens)
    assert torch.equal(torch.cat([c[0][1] for c in chunks], 1), positions)
    assert torch.equal(torch.cat([c[1] for c in chunks], 1), labels)
    assert all(torch.equal(c[0][2], documents) for c in chunks)  # whole: attention needs it
    plain, plain_labels = Collate(context_rank=1, context_size=2)(samples)
    assert torch.equal(plain, tokens[:, 32:]) and torch.equal(plain_labels, labels[:, 32:])


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.context=2", "model.num_kv_heads=1"], 2,
     r"model.num_kv_heads \(1\) must divide by parallel.tensor x parallel.context \(1 x 2 = 2\)"),
    (["parallel.context=2", "parallel.tensor=2", "model.num_kv_heads=2"], 4,
     r"model.num_kv_heads \(2\) must divide by parallel.tensor x parallel.context \(2 x 2 = 4\)"),
    (["parallel.context=3", "model.num_heads=6", "model.num_kv_heads=3", "model.hidden_size=96",
      "data.seq_len=64"], 3, r"data.seq_len \(64\) must divide by parallel.context \(3\)"),
    (["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true", "model.num_kv_heads=4",
      "data.seq_len=62"], 4, r"parallel.context x parallel.tensor \(2 x 2 = 4\) under sequence parallelism"),
    (["parallel.context=2", "parallel.pipeline=2"], 4, "parallel.context=2 with parallel.pipeline=2 is not supported"),
    (["model.document_positions=true"], 1, "needs model.document_mask=true"),
    (["model.document_mask=true", "model.dropout=0.1"], 1, "model.document_mask needs model.dropout=0"),
    (["parallel.context=2"], 2, None),
])
def test_bad_layouts_are_one_clear_message(overrides, world, message):
    cfg = load_config(TINY, [*overrides, "train.steps=10"])
    if message is None:
        cfg.validate(world)
        return
    with pytest.raises(MegalmError, match=message):
        cfg.validate(world)


def test_document_mask_needs_an_end_of_document_token(tmp_path):
    class NoEos:
        type, eod = "sentencepiece", -1

    with pytest.raises(MegalmError, match="needs a tokenizer with an end-of-document token"):
        check_documents_end_with_eod(NoEos(), [])


def test_shards_without_eod_are_one_line_and_exit_2(tmp_path):
    import json
    import subprocess
    import sys

    from megalm.data.preprocess import preprocess
    from megalm.testing.runs import train_env

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50)))
    preprocess([str(corpus)], "text", "byte", "", str(tmp_path / "noeod"), workers=1, progress=False, append_eod=False)
    run = subprocess.run(
        [sys.executable, "-m", "megalm.train", "--config", TINY, f"data.train_prefixes=[{tmp_path / 'noeod'}]",
         "model.document_mask=true", "train.steps=2", f"train.run_dir={tmp_path / 'run'}"],
        env=train_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "written without EOD tokens" in errors[0] and "--append-eod" in errors[0], run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled FlexAttention path)")
def test_compiled_flex_document_attention_on_gpu_equals_the_dense_mask_with_gradients():
    from megalm.model.documents import Packing, masked_attention

    g = torch.Generator().manual_seed(0)
    documents = (torch.arange(2 * 1024).reshape(2, 1024) // torch.tensor([[100], [333]])).cuda()
    q = torch.randn(2, 8, 1024, 64, generator=g).cuda().requires_grad_()
    k, v = (torch.randn(2, 2, 1024, 64, generator=g).cuda().requires_grad_() for _ in range(2))
    out = masked_attention(q, k, v, Packing(documents=documents))
    out.square().sum().backward()
    flex_grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=document_dense_mask(documents), enable_gqa=True)
    dense.square().sum().backward()
    torch.testing.assert_close(out, dense, rtol=2e-4, atol=2e-4)
    for got, x in zip(flex_grads, (q, k, v), strict=True):
        torch.testing.assert_close(got, x.grad, rtol=2e-3, atol=2e-3)
