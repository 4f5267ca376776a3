"""The fused, chunked output layer + cross entropy equals logits-then-loss (one process; the
tensor-parallel cases run in test_gpt_parity, where the sharded model uses it)."""

import pytest
import torch
import torch.nn.functional as F

from megalm.parallel.cross_entropy import linear_cross_entropy, vocab_parallel_cross_entropy

VOCAB, PADDED, D = 1001, 1024, 16


def _inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 7, D, generator=g).to(dtype).requires_grad_()
    w = torch.randn(PADDED, D, generator=g)
    w[VOCAB:] = 0.0  # padding rows, as the model initialises them
    w = w.to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (3, 7), generator=g)
    labels[0, :4] = -100
    return h, w, labels


def _reference(h, w, labels):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(h @ w.t(), labels, None, vocab_size=VOCAB)
    loss.backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 21, 1024])
def test_fp32_equals_unfused_and_torch(chunk):
    h, w, labels = _inputs(torch.float32)
    loss = linear_cross_entropy(h, w, labels, None, vocab_size=VOCAB, chunk=chunk)
    loss.backward()
    ref_loss, ref_h, ref_w = _reference(h, w, labels)
    torch_loss = F.cross_entropy((h @ w.t())[..., :VOCAB].reshape(-1, VOCAB), labels.reshape(-1))
    assert abs(loss.item() - ref_loss.item()) < 1e-6
    assert abs(loss.item() - torch_loss.item()) < 1e-5
    assert (h.grad - ref_h).abs().max() < 1e-6
    assert (w.grad - ref_w).abs().max() < 1e-6
    assert (w.grad[VOCAB:] == 0).all()  # padding rows never learn
    assert (h.grad[0, :4] == 0).all()  # ignored tokens give no gradient


def test_bf16_close_to_fp32_and_grad_scaled_by_upstream():
    h, w, labels = _inputs(torch.bfloat16)
    loss = linear_cross_entropy(h, w, labels, None, vocab_size=VOCAB, chunk=4)
    (3.0 * loss).backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    ref_loss, ref_h, ref_w = _reference(h.float(), w.float(), labels)
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * ref_loss.item()
    assert (h.grad.float() - 3 * ref_h).abs().max() < 2e-2 * (3 * ref_h).abs().max()
    assert (w.grad.float() - 3 * ref_w).abs().max() < 2e-2 * (3 * ref_w).abs().max()


def test_no_grad_only_computes_the_loss_and_is_stable():
    h, w, labels = _inputs(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h * 1e3, w, labels, None, vocab_size=VOCAB, chunk=8)
        ref = F.cross_entropy((h * 1e3 @ w.t())[..., :VOCAB].reshape(-1, VOCAB), labels.reshape(-1))
    assert not loss.requires_grad and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) < 1e-4 * ref.item()


def test_all_ignored_gives_zero_loss_and_gradient():
    h, w, labels = _inputs(torch.float32)
    loss = linear_cross_entropy(h, w, torch.full_like(labels, -100), None, vocab_size=VOCAB, chunk=8)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()
