"""tools/bench_data.py: data-pipeline throughput; prints one JSON object.

1. preprocessing tokens/s at 1 and 2 workers against the tokenizer's raw `encode` speed on the same
   texts in one process (target: >= 0.8x raw per worker), on a synthetic corpus with a sentencepiece
   BPE trained on it;
2. sample-index build time and peak traced memory for a synthetic 1B-token dataset (target < 5 s);
3. random sample reads at seq_len 2048 from that dataset (target >= 50k samples/s). Its .bin is a
   sparse file (1B tokens would take 2 GB of disk), so this measures the index and copy path, not
   the disk: "cold" pays a page fault per new page, "warm" repeats the same reads from the page cache.
CPU efficiency (raw encode CPU seconds / preprocessing CPU seconds of all processes) is reported as
well, since wall-clock ratios on a shared machine depend on other load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from megalm.data.gpt_dataset import GPTDataset
from megalm.data.indexed import IndexedDataset, write_index
from megalm.data.preprocess import preprocess
from megalm.data.tokenizer import build_tokenizer
from megalm.data.tokenizer_training import train_tokenizer
from megalm.errors import run_cli


def synthetic_texts(num_bytes: int, seed: int = 0) -> list[str]:
    """English-like documents: Zipf-distributed random words, 50-500 words each."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(20000)]
    texts, size = [], 0
    while size < num_bytes:
        ids = np.minimum(rng.zipf(1.3, size=int(rng.integers(50, 500))), len(words)) - 1
        text = " ".join(words[i] for i in ids) + "."
        texts.append(text)
        size += len(text) + 12
    return texts


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_preprocess(work: Path, corpus_mb: float) -> dict[str, Any]:
    texts = synthetic_texts(int(corpus_mb * 1e6))
    corpus = work / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    train_tokenizer([str(corpus)], "bpe", 8000, str(work / "tok"))
    tok = build_tokenizer("sentencepiece", str(work / "tok.model"))
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    raw_tokens = sum(len(x) for x in tok.encode_batch(texts))
    raw, raw_cpu = raw_tokens / (time.perf_counter() - t0), _cpu_seconds() - cpu0
    out: dict[str, Any] = {"corpus_mb": round(corpus.stat().st_size / 1e6, 1), "tokens": raw_tokens,
                           "raw_encode_tokens_per_s": round(raw)}
    for workers in (1, 2):
        cpu0 = _cpu_seconds()
        s = preprocess([str(corpus)], "text", "sentencepiece", str(work / "tok.model"), str(work / f"pp{workers}"),
                       workers=workers, progress=False)
        rate = s["tokens"] / s["seconds"]
        out[f"workers_{workers}"] = {
            "seconds": round(s["seconds"], 2), "tokens_per_s": round(rate),
            "ratio_per_worker_vs_raw": round(rate / (workers * raw), 3),
            # CPU seconds of raw encoding / CPU seconds of all processes: efficiency independent of other load
            "cpu_efficiency_vs_raw": round(raw_cpu / (_cpu_seconds() - cpu0), 3),
        }
    return out


def synthetic_dataset(prefix: Path, num_tokens: int, seed: int = 0) -> IndexedDataset:
    """An indexed dataset of `num_tokens` uint16 tokens (sparse .bin), documents of ~1-3000 tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 3000, size=int(num_tokens / 1500 * 1.1)).astype(np.int64)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), num_tokens) + 1]
    lengths[-1] -= lengths.sum() - num_tokens
    with open(str(prefix) + ".bin", "wb") as f:
        f.truncate(num_tokens * 2)
    write_index(str(prefix) + ".idx", np.dtype(np.uint16), lengths, np.arange(len(lengths) + 1))
    return IndexedDataset(prefix)


def bench_index_and_reads(work: Path, num_tokens: int, seq_len: int, reads: int) -> dict[str, Any]:
    ds = synthetic_dataset(work / "big", num_tokens)
    docs = np.arange(ds.num_documents)
    num_samples = (num_tokens - 1) // seq_len
    t0 = time.perf_counter()
    g = GPTDataset(ds, docs, seq_len, num_samples, seed=1, cache_dir=None, name="bench")
    build_s = time.perf_counter() - t0
    tracemalloc.start()
    GPTDataset(ds, docs, seq_len, num_samples, seed=1, cache_dir=None, name="bench")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    idx = np.random.default_rng(0).integers(0, len(g), size=reads).tolist()
    rates = []
    for _ in ("cold", "warm"):  # the second pass finds the pages in the page cache
        t0 = time.perf_counter()
        for i in idx:
            g[i]
        rates.append(reads / (time.perf_counter() - t0))
    return {
        "dataset_tokens": num_tokens, "documents": ds.num_documents, "samples": num_samples, "seq_len": seq_len,
        "index_build_s": round(build_s, 3), "index_build_peak_mb": round(peak / 2**20, 1),
        "random_reads_per_s_cold": round(rates[0]), "random_reads_per_s_warm": round(rates[1]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=20.0, help="size of the synthetic preprocessing corpus")
    p.add_argument("--tokens", type=float, default=1e9, help="tokens of the synthetic indexed dataset")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--reads", type=int, default=50000)
    p.add_argument("--skip-preprocess", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="megalm-bench-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0]}
        if not a.skip_preprocess:
            result["preprocess"] = bench_preprocess(work, a.corpus_mb)
        result["gpt_dataset"] = bench_index_and_reads(work, int(a.tokens), a.seq_len, a.reads)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
