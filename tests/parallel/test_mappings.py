"""Region functions, parallel layers, vocab-parallel cross entropy and the RNG tracker on 2 real
gloo ranks. All checks run in one launch (a spawn costs seconds); each returns measured values."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalm.errors import MegalmError
from megalm.parallel import mappings as M
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_tensor,
)
from megalm.parallel.random import TensorParallelRNG, init_generator, normal_init
from megalm.parallel.vocab import padded_vocab_size, strip_vocab_padding
from megalm.testing.distributed import run_distributed_test

WORLD = 2


def _data(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _leaf(t):
    return t.clone().requires_grad_(True)


def _check_regions() -> dict:
    g, r = dist.group.WORLD, dist.get_rank()
    full = _data(2, 4, 6)  # (batch, seq, hidden), the same on both ranks
    out = {}
    # copy: forward identity, backward all-reduce of per-rank gradients (1 + 2 = 3)
    x = _leaf(full)
    y = M.copy_to_tensor_region(x, g)
    y.backward(torch.full_like(y, r + 1.0))
    out["copy"] = torch.equal(y, full) and torch.equal(x.grad, torch.full_like(full, 3.0))
    # reduce: forward all-reduce, backward identity
    x = _leaf(full * (r + 1))
    y = M.reduce_from_tensor_region(x, g)
    y.backward(full)
    out["reduce"] = torch.equal(y, full * 3) and torch.equal(x.grad, full)
    # scatter/gather along the last dim
    x = _leaf(full)
    y = M.scatter_to_tensor_region(x, g)
    y.backward(torch.full_like(y, r + 1.0))
    expect_grad = torch.cat([torch.ones(2, 4, 3), torch.full((2, 4, 3), 2.0)], dim=-1)
    out["scatter"] = torch.equal(y, full[..., 3 * r: 3 * r + 3]) and torch.equal(x.grad, expect_grad)
    x = _leaf(full[..., 3 * r: 3 * r + 3])
    y = M.gather_from_tensor_region(x, g)
    y.backward(full * 2)
    out["gather"] = torch.equal(y, full) and torch.equal(x.grad, 2 * full[..., 3 * r: 3 * r + 3])
    out.update(_check_sequence_regions(full, g, r))
    out["none_is_identity"] = all(
        f(full, None) is full for f in (M.copy_to_tensor_region, M.reduce_from_tensor_region,
                                        M.scatter_to_sequence_region, M.reduce_scatter_to_sequence_region)
    )
    return out


def _check_sequence_regions(full, g, r) -> dict:
    out, chunk = {}, slice(2 * r, 2 * r + 2)
    x = _leaf(full)
    y = M.scatter_to_sequence_region(x, g)
    y.backward(torch.full_like(y, r + 1.0))
    expect = torch.cat([torch.ones(2, 2, 6), torch.full((2, 2, 6), 2.0)], dim=1)
    out["scatter_seq"] = torch.equal(y, full[:, chunk]) and torch.equal(x.grad, expect)
    for reduce in (True, False):
        x = _leaf(full[:, chunk])
        y = M.gather_from_sequence_region(x, g, tensor_parallel_output_grad=reduce)
        y.backward(full * (r + 1))  # each rank a different (partial) gradient
        grad = full[:, chunk] * (3 if reduce else r + 1)
        out[f"gather_seq_reduce={reduce}"] = torch.equal(y, full) and torch.equal(x.grad, grad)
    x = _leaf(full * (r + 1))
    y = M.reduce_scatter_to_sequence_region(x, g)
    y.backward(full[:, chunk] * 10)
    out["reduce_scatter"] = torch.equal(y, (full * 3)[:, chunk]) and torch.equal(x.grad, full * 10)
    return out


def _gen(name):
    return normal_init(0.5, init_generator(7, name))


def _check_linears(sequence_parallel: bool) -> dict:
    """Column [gate; up] (stride 2, bias) -> gelu(gate) * up -> Row (bias), against tensor size 1."""
    g, r = dist.group.WORLD, dist.get_rank()
    col = ColumnParallelLinear(6, 8, group=g, init_method=_gen("c"), bias=True, stride=2, sequence_parallel=sequence_parallel)
    row = RowParallelLinear(4, 6, group=g, init_method=_gen("r"), bias=True, sequence_parallel=sequence_parallel)
    ref_col = ColumnParallelLinear(6, 8, group=None, init_method=_gen("c"), bias=True, stride=2)
    ref_row = RowParallelLinear(4, 6, group=None, init_method=_gen("r"), bias=True)
    with torch.no_grad():  # nonzero biases, the same everywhere
        for a, b in ((col, ref_col), (row, ref_row)):
            b.bias.copy_(torch.linspace(-1, 1, b.bias.numel()))
            a.bias.copy_(shard_tensor(b.bias, 0, r, WORLD, 2) if a is col else b.bias)
    init_exact = torch.equal(col.weight, shard_tensor(ref_col.weight, 0, r, WORLD, 2)) and torch.equal(
        row.weight, shard_tensor(ref_row.weight, 1, r, WORLD))
    full = _data(2, 4, 6, seed=1)
    x, ref_x = _leaf(full[:, 2 * r: 2 * r + 2] if sequence_parallel else full), _leaf(full)
    def glu(h):
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate) * up

    y, ref_y = row(glu(col(x))), ref_row(glu(ref_col(ref_x)))
    weight = _data(*ref_y.shape, seed=2)
    (y * (weight[:, 2 * r: 2 * r + 2] if sequence_parallel else weight)).sum().backward()
    (ref_y * weight).sum().backward()
    ref_y_mine = ref_y[:, 2 * r: 2 * r + 2] if sequence_parallel else ref_y
    ref_xg = ref_x.grad[:, 2 * r: 2 * r + 2] if sequence_parallel else ref_x.grad
    return {
        "init_exact": init_exact,
        "y": (y - ref_y_mine).abs().max().item(),
        "x_grad": (x.grad - ref_xg).abs().max().item(),
        "col_w_grad": (col.weight.grad - shard_tensor(ref_col.weight.grad, 0, r, WORLD, 2)).abs().max().item(),
        "col_b_grad": (col.bias.grad - shard_tensor(ref_col.bias.grad, 0, r, WORLD, 2)).abs().max().item(),
        "row_w_grad": (row.weight.grad - shard_tensor(ref_row.weight.grad, 1, r, WORLD)).abs().max().item(),
        "row_b_grad": (row.bias.grad - ref_row.bias.grad).abs().max().item(),
        "marks": (col.weight.tensor_model_parallel, col.weight.partition_dim, col.weight.partition_stride,
                  row.weight.partition_dim, row.bias.tensor_model_parallel, row.bias.sequence_parallel),
    }


def _check_embedding_and_loss() -> dict:
    g, r = dist.group.WORLD, dist.get_rank()
    vocab = 1001
    vpad = padded_vocab_size(vocab, 64, WORLD)
    emb = VocabParallelEmbedding(vpad, 8, group=g, init_method=normal_init(1.0, init_generator(1, "e"), rows=vocab))
    ref = VocabParallelEmbedding(vpad, 8, group=None, init_method=normal_init(1.0, init_generator(1, "e"), rows=vocab))
    tokens = torch.tensor([[0, 511, 512, 1000], [999, 3, 700, 512]])
    y, ref_y = emb(tokens), ref(tokens)
    y.sum().backward()
    ref_y.sum().backward()
    out = {
        "vpad": vpad, "emb_init_exact": torch.equal(emb.weight, shard_tensor(ref.weight, 0, r, WORLD)),
        "padding_rows_zero": torch.count_nonzero(ref.weight[vocab:]).item() == 0,
        "emb_fwd_exact": torch.equal(y, ref_y),
        "emb_grad_exact": torch.equal(emb.weight.grad, shard_tensor(ref.weight.grad, 0, r, WORLD)),
    }
    logits = _data(2, 4, vpad, seed=3) * 4
    logits[..., vocab:] = 50.0  # padding columns must take no probability
    labels = torch.tensor([[0, 1000, 512, -100], [511, 7, -100, 999]])
    shard = _leaf(shard_tensor(logits, 2, r, WORLD))
    loss = vocab_parallel_cross_entropy(shard, labels, g, vocab_size=vocab)
    loss.backward()
    real = _leaf(strip_vocab_padding(logits, vocab, dim=-1))
    ref_loss = F.cross_entropy(real.view(-1, vocab), labels.view(-1), ignore_index=-100)
    ref_loss.backward()
    ref_grad = torch.cat([real.grad, torch.zeros(2, 4, vpad - vocab)], dim=-1)
    out["ce_loss"] = abs(loss.item() - ref_loss.item())
    out["ce_grad"] = (shard.grad - shard_tensor(ref_grad, 2, r, WORLD)).abs().max().item()
    big = logits + 1e4  # exp(1e4) overflows fp32: the max must be subtracted first
    big_loss = vocab_parallel_cross_entropy(shard_tensor(big, 2, r, WORLD), labels, g, vocab_size=vocab)
    big_ref = F.cross_entropy(big[..., :vocab].reshape(-1, vocab), labels.view(-1), ignore_index=-100)
    out["ce_stable"] = abs(big_loss.item() - big_ref.item()) if torch.isfinite(big_loss) else float("inf")
    return out


def _check_rng() -> dict:
    torch.manual_seed(5)  # the default generator, seeded alike on the tensor ranks
    rng = TensorParallelRNG(seed=5, tensor_rank=dist.get_rank(), device="cpu")
    x = torch.ones(1000)
    outside = F.dropout(x, 0.5)
    with rng.fork():
        inside = F.dropout(x, 0.5)
    after = F.dropout(x, 0.5)
    torch.manual_seed(5)
    F.dropout(x, 0.5)
    undisturbed = torch.equal(after, F.dropout(x, 0.5))  # the fork left the default stream alone
    both = torch.stack([outside, inside])
    masks = [torch.empty_like(both) for _ in range(WORLD)]
    dist.all_gather(masks, both)
    return {
        "outside_agree": torch.equal(masks[0][0], masks[1][0]),
        "inside_differ": not torch.equal(masks[0][1], masks[1][1]),
        "undisturbed": undisturbed,
    }


def _check_errors() -> dict:
    from megalm.config import ModelConfig
    from megalm.model import Block
    from megalm.parallel.context import TensorParallel

    cfg = ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=1, num_layers=1, vocab_size=64)
    try:
        Block(cfg, 0, TensorParallel.build(dist.group.WORLD, seed=0))
        mqa = ""
    except MegalmError as e:
        mqa = str(e)
    try:
        M.scatter_to_sequence_region(torch.zeros(1, 3, 2), dist.group.WORLD)
        odd = ""
    except MegalmError as e:
        odd = str(e)
    return {"mqa": mqa, "odd_seq": odd}


def _all_checks() -> dict:
    return {
        "regions": _check_regions(),
        "linear": _check_linears(False),
        "linear_sp": _check_linears(True),
        "embedding_loss": _check_embedding_and_loss(),
        "rng": _check_rng(),
        "errors": _check_errors(),
    }


@pytest.fixture(scope="module")
def results():
    return run_distributed_test(_all_checks, world_size=WORLD)


def test_region_functions_forward_and_backward(results):
    for rank_out in results:
        assert rank_out["regions"] == {k: True for k in rank_out["regions"]}, rank_out["regions"]


@pytest.mark.parametrize("key", ["linear", "linear_sp"])
def test_column_row_parallel_match_unsharded(results, key):
    for out in results:
        o = out[key]
        assert o["init_exact"]
        assert o["marks"] == (True, 0, 2, 1, False, key == "linear_sp")
        for name in ("y", "x_grad", "col_w_grad", "col_b_grad", "row_w_grad", "row_b_grad"):
            assert o[name] < 1e-5, (name, o[name])
        # weight gradients involve no reduction across ranks: X^T dY_i and X_i^T dY are exact
        assert o["col_w_grad"] == 0.0 and o["row_w_grad"] == 0.0


def test_vocab_parallel_embedding_and_cross_entropy(results):
    for out in results:
        o = out["embedding_loss"]
        assert o["vpad"] == 1024
        assert o["emb_init_exact"] and o["padding_rows_zero"] and o["emb_fwd_exact"] and o["emb_grad_exact"]
        assert o["ce_loss"] < 1e-6 and o["ce_grad"] < 1e-7 and o["ce_stable"] < 1e-5


def test_rng_tracker_semantics(results):
    for out in results:
        assert out["rng"] == {"outside_agree": True, "inside_differ": True, "undisturbed": True}


def test_clear_errors(results):
    o = results[0]["errors"]
    assert "kv heads (1) must divide by the tensor-parallel size (2)" in o["mqa"]
    assert "sequence length must divide by parallel.tensor" in o["odd_seq"]
