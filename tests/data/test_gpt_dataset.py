"""Sample indices (vectorized, cached), blending, split building, the sampler and the DataLoader."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from megalm.config import DataConfig
from megalm.data.blend import BlendedDataset, build_blend_index
from megalm.data.builder import build_datasets, split_bounds
from megalm.data.gpt_dataset import GPTDataset, build_sample_index
from megalm.data.indexed import IndexedDataset, IndexedDatasetWriter
from megalm.data.meta import write_meta
from megalm.data.sampler import MegatronPretrainingSampler, build_dataloader
from megalm.data.tokenizer import ByteTokenizer, build_tokenizer
from megalm.errors import MegalmError


def make_shard(prefix: Path, num_docs: int, seed: int = 0, with_meta: bool = True) -> IndexedDataset:
    """Documents of 0-40 tokens; token values encode (document, position) so windows can be checked."""
    rng = np.random.default_rng(seed)
    w = IndexedDatasetWriter(prefix, np.uint16)
    for d in range(num_docs):
        n = int(rng.integers(0, 41))
        w.add_document((np.arange(n) + 100 * d) % 250)
    w.finish()
    if with_meta:
        write_meta(prefix, {"tokenizer": ByteTokenizer().describe()})
    return IndexedDataset(prefix)


def stream_of(ds: IndexedDataset, doc_index: np.ndarray) -> np.ndarray:
    return np.concatenate([ds.document(int(d)) for d in doc_index])


def test_samples_are_contiguous_windows_and_each_token_once_per_epoch(tmp_path: Path) -> None:
    ds = make_shard(tmp_path / "s", 200)
    docs = np.arange(20, 180)  # a split
    seq = 16
    epoch_tokens = int(ds.document_lengths()[docs].sum())
    n = -(-epoch_tokens // seq)  # the samples starting in the first epoch
    g = GPTDataset(ds, docs, seq, n, seed=3, cache_dir=str(tmp_path / "cache"), name="train")
    assert sorted(g.document_index[: len(docs)].tolist()) == docs.tolist()  # epoch 0 is a permutation
    stream = stream_of(ds, g.document_index)
    by_position = {g.sample_id(i): g[i] for i in range(len(g))}
    assert sorted(by_position) == list(range(n))
    for j, sample in by_position.items():
        assert sample.dtype == np.int64 and len(sample) == seq + 1
        np.testing.assert_array_equal(sample, stream[j * seq : j * seq + seq + 1])
    labels = np.concatenate([by_position[j][1:] for j in range(n)])
    np.testing.assert_array_equal(labels, stream[1 : n * seq + 1])  # every token is a label once
    assert [g.sample_id(i) for i in range(5)] != list(range(5))  # shuffled


def test_first_samples_do_not_depend_on_how_many_are_asked_for(tmp_path: Path) -> None:
    # extending a run (more steps) or resuming with another layout keeps the data order
    ds = make_shard(tmp_path / "s", 60, seed=2)
    small = GPTDataset(ds, np.arange(60), 8, 40, seed=5, cache_dir=None, name="train")
    large = GPTDataset(ds, np.arange(60), 8, 900, seed=5, cache_dir=None, name="train")  # several epochs
    assert len(large.document_index) > 3 * 60
    for i in range(40):
        np.testing.assert_array_equal(small[i], large[i])


def test_many_epochs_reshuffle_documents(tmp_path: Path) -> None:
    ds = make_shard(tmp_path / "s", 30, seed=1)
    docs = np.arange(30)
    g = GPTDataset(ds, docs, 8, 500, seed=0, cache_dir=None, name="train")
    per_epoch = g.document_index.reshape(-1, 30)  # (the last epoch only completes the last window)
    assert len(per_epoch) >= 5 and all(sorted(e) == list(range(30)) for e in per_epoch)
    assert not np.array_equal(per_epoch[0], per_epoch[1])
    stream = stream_of(ds, g.document_index)
    j = g.sample_id(499)
    np.testing.assert_array_equal(g[499], stream[j * 8 : j * 8 + 9])


def test_sample_index_skips_empty_documents() -> None:
    idx = build_sample_index(np.array([3, 0, 0, 5, 0, 4]), 4, 2)
    assert idx.tolist() == [[0, 0], [3, 1], [5, 0]]


def test_cache_is_reused_keyed_and_pickles_without_copy(tmp_path: Path) -> None:
    ds = make_shard(tmp_path / "s", 50)
    cache = tmp_path / "cache"
    a = GPTDataset(ds, np.arange(50), 8, 100, 1, str(cache), "train")
    files = sorted(p.name for p in cache.glob("*.npy"))
    assert len(files) == 3 and all(f.startswith(a.cache_key) for f in files)
    b = GPTDataset(ds, np.arange(50), 8, 100, 1, str(cache), "train")
    assert isinstance(b.shuffle_index, np.memmap) and b.cache_key == a.cache_key
    assert len(list(cache.glob("*.npy"))) == 3
    for changed in (dict(seed=2), dict(num_samples=101), dict(seq_len=9), dict(docs=np.arange(49))):
        kw = dict(docs=np.arange(50), seq_len=8, num_samples=100, seed=1) | changed
        c = GPTDataset(ds, kw["docs"], kw["seq_len"], kw["num_samples"], kw["seed"], str(cache), "train")
        assert c.cache_key != a.cache_key
    state = pickle.dumps(a)
    assert len(state) < 4000  # arrays are re-mapped, not copied
    np.testing.assert_array_equal(pickle.loads(state)[7], a[7])


def test_blend_proportions_are_exact_and_deterministic() -> None:
    w = [0.5, 0.3, 0.2]
    idx = build_blend_index(w, 10_000)
    counts = np.zeros(3)
    worst = 0.0
    for i, k in enumerate(idx["dataset_index"].tolist()):
        counts[k] += 1
        worst = max(worst, float(np.max(np.abs(counts - np.array(w) * (i + 1)))))
    assert worst <= 1.0
    assert counts.tolist() == [5000, 3000, 2000]
    for k in range(3):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert idx["dataset_sample_index"][idx["dataset_index"] == k].tolist() == list(range(int(counts[k])))
    again = build_blend_index([5, 3, 2], 10_000)  # unnormalised weights, same schedule
    np.testing.assert_array_equal(again["dataset_index"], idx["dataset_index"])


def test_blended_dataset_reads_from_its_parts(tmp_path: Path) -> None:
    parts = [np.full((40, 3), k) for k in range(2)]
    b = BlendedDataset(parts, [3, 1], 40, str(tmp_path / "c"))
    assert [int(b[i][0]) for i in range(8)] == [0, 0, 1, 0, 0, 0, 1, 0]
    with pytest.raises(MegalmError, match="needs"):
        BlendedDataset([np.zeros((2, 3)), np.zeros((40, 3))], [0.5, 0.5], 40)


def test_split_bounds_follow_megatron_rounding() -> None:
    assert split_bounds(1000, [0.98, 0.01, 0.01]) == [0, 980, 990, 1000]
    assert split_bounds(10, [0.7, 0.2, 0.1]) == [0, 7, 9, 10]
    assert split_bounds(3, [0.98, 0.01, 0.01]) == [0, 3, 3, 3]


def test_build_datasets_splits_blends_and_checks(tmp_path: Path, tokenizers: dict[str, Path]) -> None:
    make_shard(tmp_path / "a", 100, seed=1)
    make_shard(tmp_path / "b", 100, seed=2)
    tok = ByteTokenizer()
    cfg = DataConfig(train_prefixes=[str(tmp_path / "a")], split="80,10,10", seq_len=8, cache_dir=str(tmp_path / "c"))
    train, valid, test = build_datasets(cfg, tok, 1, (50, 10, 0))
    assert test is None and len(train) == 50 and len(valid) == 10
    assert set(train.document_index.tolist()) == set(range(80)) and set(valid.document_index.tolist()) == set(range(80, 90))
    cfg.train_prefixes = [[0.7, str(tmp_path / "a")], [0.3, str(tmp_path / "b")]]
    train, valid, _ = build_datasets(cfg, tok, 1, (100, 10, 0))
    assert np.bincount(train.dataset_index).tolist() == [70, 30] and len(train[99]) == 9
    cfg.split = "100,0,0"
    assert build_datasets(cfg, tok, 1, (10, 10, 10))[1:] == (None, None)
    sp = build_tokenizer("sentencepiece", str(tokenizers["bpe"]))
    with pytest.raises(MegalmError, match="another tokenizer"):
        build_datasets(cfg, sp, 1, (10, 0, 0))
    cfg.train_prefixes = [str(tmp_path / "nope")]
    with pytest.raises(MegalmError, match="nope"):
        build_datasets(cfg, tok, 1, (10, 0, 0))


def test_sampler_resumes_at_consumed_samples_with_another_data_parallel_size() -> None:
    total, micro = 200, 2
    seen: list[int] = []

    def run(consumed: int, dp: int, steps: int) -> int:
        per_rank = [iter(MegatronPretrainingSampler(total, consumed, micro, r, dp)) for r in range(dp)]
        for _ in range(steps):
            step = [next(it) for it in per_rank]
            assert [i for batch in step for i in batch] == list(range(consumed, consumed + micro * dp))
            seen.extend(i for batch in step for i in batch)
            consumed += micro * dp
        return consumed

    consumed = run(0, 4, 5)  # 40 samples at dp=4
    consumed = run(consumed, 2, 7)  # resume at dp=2
    consumed = run(consumed, 3, 4)  # and at dp=3
    assert sorted(seen) == list(range(consumed)) and len(seen) == len(set(seen)) == 40 + 28 + 24
    assert MegatronPretrainingSampler(10, 4, 2, 1, 2).__iter__().__next__() == [6, 7]
    assert len(MegatronPretrainingSampler(10, 4, 2, 1, 2)) == 1
    with pytest.raises(MegalmError):
        MegatronPretrainingSampler(10, 0, 2, 2, 2)


def test_dataloader_yields_shifted_int64_batches(tmp_path: Path) -> None:
    import torch

    ds = make_shard(tmp_path / "s", 60)
    g = GPTDataset(ds, np.arange(60), 8, 40, 1, str(tmp_path / "c"), "train")
    loader = build_dataloader(g, MegatronPretrainingSampler(40, 8, 4, 1, 2), num_workers=1)
    batches = list(loader)
    assert len(batches) == 4
    tokens, labels = batches[0]
    assert tokens.dtype == labels.dtype == torch.int64 and tokens.shape == labels.shape == (4, 8)
    want = np.stack([g[i] for i in range(12, 16)])
    np.testing.assert_array_equal(tokens.numpy(), want[:, :-1])
    np.testing.assert_array_equal(labels.numpy(), want[:, 1:])


def _build_in_child(prefix: str, cache: str, q: object) -> None:
    g = GPTDataset(IndexedDataset(prefix), np.arange(300), 8, 2000, 5, cache, "train")
    q.put(np.asarray(g.shuffle_index[:50]).tolist() + [g[3].tolist()])


def test_concurrent_ranks_build_the_cache_once(tmp_path: Path) -> None:
    import multiprocessing as mp

    make_shard(tmp_path / "s", 300)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path / "s"), str(tmp_path / "c"), q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert len(list((tmp_path / "c").glob("*.npy"))) == 3 and not list((tmp_path / "c").glob("*.partial"))
