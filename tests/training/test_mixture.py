"""Changing the data mixture mid-run (issue 25): per-source positions in the checkpoint, a mixture
changed on resume or by data.mixture_schedule continues every source from its own position, and data
that changed under a run is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalm.testing.distributed import DistributedTestError, run_distributed_test
from megalm.testing.parity import train_rank
from megalm.testing.runs import TINY, read_metrics, step_losses


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """Three byte-tokenized shards of different documents (thirds of the built-in corpus)."""
    from megalm.data.preprocess import preprocess
    from megalm.data.stdlib_corpus import write_stdlib_corpus

    d = tmp_path_factory.mktemp("sources")
    lines = write_stdlib_corpus(d / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    prefixes = []
    for name, part in (("web", lines[::3]), ("books", lines[1::3]), ("code", lines[2::3])):
        (d / f"{name}.jsonl").write_text("\n".join(part) + "\n", encoding="utf-8")
        preprocess([str(d / f"{name}.jsonl")], "text", "byte", "", str(d / name), workers=1, progress=False)
        prefixes.append(str(d / name))
    return prefixes[0], prefixes[1], prefixes[2]


@pytest.fixture(scope="module")
def two_sources(sources: tuple[str, str, str]) -> tuple[str, str]:
    return sources[0], sources[1]


def base(run_dir: Path, *extra: str) -> list[str]:
    return ["train.global_batch_size=4", "train.micro_batch_size=2", "train.precision=fp32", "logging.sample_ids=true",
            "logging.tensorboard=false", "train.eval_interval=0", "train.log_interval=1", "schedule.kind=constant",
            f"train.run_dir={run_dir}", *extra]


def train(run_dir: Path, *extra: str, world: int = 2) -> None:
    run_distributed_test(train_rank, world, args=(TINY, base(run_dir, *extra)), env={"DS_ACCELERATOR": "cpu"})


def drawn(run_dir: Path) -> dict[str, list[int]]:
    """Each source's sample numbers in the order the run drew them (data ranks interleaved per micro batch)."""
    out: dict[str, list[int]] = {}
    for f in sorted((run_dir / "sample_sources").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            for source, j in json.loads(line):
                out.setdefault(Path(source).name, []).append(j)
    return {k: sorted(v) for k, v in out.items()}


def checkpoint_data(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"global_step{step}" / "megalm.json").read_text())["data"]


def test_a_mixture_changed_on_resume_continues_every_source_from_its_position(sources, tmp_path):
    web, books, code = sources
    first = [f"data.train_prefixes=[[0.5,{web}],[0.5,{books}]]", "checkpoint.interval=6"]
    run = tmp_path / "run"
    train(run, *first, "train.steps=6")
    saved = checkpoint_data(run, 6)
    assert saved["positions"] == {web: 12, books: 12}  # 6 steps x 4 samples, half each
    assert saved["mixture"] == {"sources": [web, books], "phases": [[0, [0.5, 0.5]]]}
    # the same mixture resumed: bit-identical to the uninterrupted run (today's guarantee)
    same, whole = tmp_path / "same", tmp_path / "whole"
    train(whole, *first, "train.steps=12")
    import shutil

    shutil.copytree(run, same)
    train(same, *first, "train.steps=12")
    assert [step_losses(same)[s] for s in range(7, 13)] == [step_losses(whole)[s] for s in range(7, 13)]
    # resumed with 0.9 / 0.1: each source continues where it stopped, nothing repeated or skipped
    changed = [f"data.train_prefixes=[[0.9,{web}],[0.1,{books}]]", "checkpoint.interval=6"]
    train(run, *changed, "train.steps=12")
    seen = drawn(run)
    assert seen["web"] == list(range(len(seen["web"]))) and seen["books"] == list(range(len(seen["books"])))
    assert len(seen["web"]) == 12 + round(0.9 * 24) and len(seen["books"]) == 12 + round(0.1 * 24)
    later = checkpoint_data(run, 12)
    assert later["mixture"]["phases"] == [[0, [0.5, 0.5]], [24, [0.9, 0.1]]]
    assert later["positions"] == {web: len(seen["web"]), books: len(seen["books"])}
    weights = [r for r in read_metrics(run) if "mixture/web" in r]
    assert weights[0]["mixture/web"] == 0.5 and weights[-1]["mixture/web"] == pytest.approx(0.9)
    # reshard keeps what the data resumes on
    from megalm.convert.reshard import reshard

    reshard(run, tmp_path / "tp2", tensor=2, pipeline=1)
    assert checkpoint_data(tmp_path / "tp2", 12) == later
    # then web removed and code added: books goes on from its position, code starts at its first sample
    train(run, f"data.train_prefixes=[[0.5,{books}],[0.5,{code}]]", "checkpoint.interval=6", "train.steps=16")
    seen = drawn(run)
    assert all(seen[s] == list(range(len(seen[s]))) for s in ("web", "books", "code")), seen
    assert len(seen["web"]) == later["positions"][web]  # not read again
    assert len(seen["books"]) == later["positions"][books] + 8 and len(seen["code"]) == 8


def test_a_mixture_schedule_switches_weights_at_its_step_and_resumes_exactly(two_sources, tmp_path):
    # the last steps on books (an anneal): from step 4 the weights are 0.2 / 0.8; stopped at step 3 and
    # resumed, the run equals the uninterrupted one; every source's samples continue in order
    web, books = two_sources
    mix = [f"data.train_prefixes=[[0.5,{web}],[0.5,{books}]]", f"data.mixture_schedule=[[4,[[0.2,{web}],[0.8,{books}]]]]"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train(whole, *mix, "train.steps=8")
    train(stopped, *mix, "train.steps=3", "checkpoint.save_at_end=true")
    train(stopped, *mix, "train.steps=8")
    assert [step_losses(stopped)[s] for s in range(4, 9)] == [step_losses(whole)[s] for s in range(4, 9)]
    seen = drawn(whole)
    assert seen["web"] == list(range(len(seen["web"]))) and seen["books"] == list(range(len(seen["books"])))
    assert len(seen["books"]) == 8 + round(0.8 * 16)  # 4 steps at 0.5, 4 at 0.8 of 4 samples
    logged = {r["step"]: r["mixture/books"] for r in read_metrics(whole) if "mixture/books" in r}
    assert logged[4] == 0.5 and logged[5] == pytest.approx(0.8)  # the weights each step drew with


def test_data_changed_under_a_run_is_one_line_unless_accepted(two_sources, tmp_path):
    # a source re-preprocessed with other documents, or another data.seq_len: refused at resume in one
    # line naming it and the key that accepts it; with the key the run goes on
    from megalm.data.preprocess import preprocess

    web, books = two_sources
    source = tmp_path / "source"
    (tmp_path / "a.jsonl").write_text(Path(web).with_suffix(".jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    preprocess([str(tmp_path / "a.jsonl")], "text", "byte", "", str(source), workers=1, progress=False)
    mix = [f"data.train_prefixes=[[0.5,{source}],[0.5,{books}]]"]
    run = tmp_path / "run"
    train(run, *mix, "train.steps=2", "checkpoint.save_at_end=true")
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[: len(lines) // 2]) + "\n", encoding="utf-8")
    preprocess([str(tmp_path / "a.jsonl")], "text", "byte", "", str(source), workers=1, progress=False)
    for extra, message in (([], f"data source {source} changed since the checkpoint (bin_bytes differs)"),
                           (["data.seq_len=32"], "data.seq_len is 32, the checkpoint trained with 64"),
                           (["data.split=90,5,5"], "data.split is '90,5,5', the checkpoint trained with '98,1,1'")):
        with pytest.raises(DistributedTestError) as refused:
            train(run, *mix, *extra, "train.steps=4")
        assert message in str(refused.value) and "set data.accept_changed_data=true" in str(refused.value)
    assert max(step_losses(run)) == 2
    train(run, *mix, "train.steps=4", "data.accept_changed_data=true")
    assert max(step_losses(run)) == 4


def test_the_loss_of_each_source_is_logged_and_equal_at_every_layout(two_sources, tmp_path):
    # loss/<source>: the mean token loss of each source's samples of the step (log_interval 1), from the
    # per-token losses the loss already computes; the step's loss is their mean weighted by each
    # source's samples (all samples have seq_len labels); the same at DP2, TP2, PP2 and CP2 (1e-5)
    # validation too (val_loss/<source> at each evaluation): val_loss, the mean of equal micro batches'
    # means, = the sources' val losses weighted by their validation samples (counted from the split's own
    # blend); the same at every layout
    web, books = two_sources
    mix = [f"data.train_prefixes=[[0.75,{web}],[0.25,{books}]]", "train.steps=3", "train.eval_interval=3",
           "train.eval_steps=2"]
    runs = {"one": ([], 1), "dp2": ([], 2), "tp2": (["parallel.tensor=2"], 2), "pp2": (["parallel.pipeline=2"], 2),
            "cp2": (["parallel.context=2"], 2), "unfused": (["model.loss_chunk_tokens=0"], 1)}
    logged = {}
    for name, (layout, world) in runs.items():
        train(tmp_path / name, *mix, *layout, world=world)
        logged[name] = {r["step"]: r for r in read_metrics(tmp_path / name) if "loss/web" in r}
        assert sorted(logged[name]) == [1, 2, 3], name
    counts: dict[int, dict[str, int]] = {}
    for f in (tmp_path / "one" / "sample_sources").glob("rank*.jsonl"):
        for i, line in enumerate(f.read_text().splitlines()):  # micro batches of 2, 2 per step
            for source, _ in json.loads(line):
                counts.setdefault(i // 2 + 1, {}).setdefault(Path(source).name, 0)
                counts[i // 2 + 1][Path(source).name] += 1
    for step, r in logged["one"].items():
        n = counts[step]
        mean = sum(r[f"loss/{k}"] * n[k] for k in n) / sum(n.values())
        assert mean == pytest.approx(r["loss"], rel=1e-6), (step, r, n)
        assert r["loss/web"] != pytest.approx(r["loss/books"], rel=1e-3)  # two sources, two losses
    for name, by_step in logged.items():
        for step, r in by_step.items():
            for key in ("loss/web", "loss/books"):
                assert r[key] == pytest.approx(logged["one"][step][key], rel=1e-5), (name, step, key)
    val = {name: [r for r in read_metrics(tmp_path / name) if "val_loss" in r] for name in runs}
    n, direct = validation_sources(TINY, [*base(tmp_path / "one"), *mix], tmp_path / "one" / "checkpoints")
    (one,) = val["one"]
    assert one["val_loss"] == pytest.approx(sum(one[f"val_loss/{k}"] * n[k] for k in n) / sum(n.values()), rel=1e-6)
    for k, loss in direct.items():  # each source's samples through the saved model, one by one
        assert one[f"val_loss/{k}"] == pytest.approx(loss, rel=1e-5), (k, one, direct)
    assert one["val_loss/web"] != pytest.approx(one["val_loss/books"], rel=1e-3), one
    for name, (r,) in val.items():
        for key in ("val_loss", "val_loss/web", "val_loss/books"):
            assert r[key] == pytest.approx(one[key], rel=1e-5), (name, key)


def validation_sources(config: str, overrides: list[str], checkpoints: Path) -> tuple[dict[str, int], dict[str, float]]:
    """How many of the validation batches' samples each source gives (the valid split's blend, rebuilt),
    and each source's mean token loss on them by the model saved in `checkpoints`, computed here."""
    import torch

    from megalm.config import load_config
    from megalm.data.builder import build_datasets
    from megalm.data.tokenizer import build_tokenizer
    from megalm.inference.load import load_from_checkpoint

    cfg = load_config(config, overrides)
    d, t = cfg.data, cfg.train
    _, valid, _ = build_datasets(d, build_tokenizer(d.tokenizer_type, d.tokenizer_model), t.seed,
                                 (t.steps * t.global_batch_size, t.eval_steps * t.global_batch_size, 0))
    model, _ = load_from_checkpoint(checkpoints / (checkpoints / "latest").read_text())
    names = [Path(ds.indexed.prefix).name for ds in valid.datasets]
    counts, sums = dict.fromkeys(names, 0), dict.fromkeys(names, 0.0)
    for i in range(t.eval_steps * t.global_batch_size):
        source = names[valid.source_of(i)[0]]
        tokens = torch.from_numpy(valid[i])
        with torch.no_grad():
            logits = model(tokens[None, :-1])[0, :, :cfg.model.vocab_size].double()
        counts[source] += 1
        sums[source] += float(torch.nn.functional.cross_entropy(logits, tokens[1:], reduction="sum"))
    return counts, {k: sums[k] / (counts[k] * d.seq_len) for k in names if counts[k]}
