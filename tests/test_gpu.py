"""The CUDA paths of a whole run on one GPU (skipped without CUDA): the tiny preset trained in bf16
on the device (NCCL, flash SDPA, fused AdamW), its synchronous and asynchronous (pinned host buffer)
saves, a resume from them, the export to Hugging Face and KV-cache generation on the GPU.
The 1B preset's step is tests/test_benchmark.py's gpu test; compiled FlexAttention is
tests/long_context/test_documents.py's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from megalm.testing.runs import REPO, TINY, gpu_env, read_metrics, step_losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 6


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=gpu_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Byte shards of made-up sentences (learnable in a few steps; no corpus from outside)."""
    from megalm.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("gpu_shards")
    words = ["the", "model", "trains", "on", "a", "device", "and", "saves", "its", "state", "every", "step"]
    g = torch.Generator().manual_seed(0)
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as f:
        for _ in range(400):
            picks = torch.randint(0, len(words), (int(torch.randint(8, 40, (1,), generator=g)),), generator=g)
            f.write(json.dumps({"text": " ".join(words[i] for i in picks) + "."}) + "\n")
    preprocess([str(d / "corpus.jsonl")], "text", "byte", "", str(d / "docs"), workers=1, progress=False)
    return str(d / "docs")


def train(run_dir, shards: str, *overrides: str) -> subprocess.CompletedProcess:
    return run("-m", "megalm.train", "--config", TINY, f"data.train_prefixes=[{shards}]", f"train.run_dir={run_dir}",
               f"train.steps={STEPS}", "train.precision=bf16", "checkpoint.interval=3", "train.eval_interval=3",
               "train.eval_steps=1", "data.split=90,10,0", "logging.straggler_interval=2", "logging.tensorboard=false",
               *overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shards: str) -> dict:
    d = tmp_path_factory.mktemp("gpu_runs")
    out = {name: train(d / name, shards, f"checkpoint.async_save={name == 'async'}") for name in ("sync", "async")}
    return {"dir": d, **out}


def test_bf16_run_trains_on_the_gpu(runs):
    assert "(cuda:0, nccl)" in runs["sync"].stdout + runs["sync"].stderr
    rows = [r for r in read_metrics(runs["dir"] / "sync") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # learns (ln 257 = 5.55 at the start)
    assert 0 < rows[-1]["mem_gib"] < 2  # torch.cuda.max_memory_allocated: the device's memory, not the host's
    metrics = read_metrics(runs["dir"] / "sync")
    assert [r["step"] for r in metrics if "val_loss" in r] == [3, 6]  # evaluation on the device
    assert any(k.startswith("straggler") for r in metrics for k in r)  # the straggler gather, on NCCL


def _weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    from megalm.convert.reader import open_checkpoint, read_state

    state, _ = read_state(open_checkpoint(run_dir / "checkpoints" / f"global_step{step}"))
    return state


def test_async_save_through_pinned_buffers_writes_what_a_synchronous_save_writes(runs):
    d = runs["dir"]
    assert step_losses(d / "async") == pytest.approx(step_losses(d / "sync"), rel=1e-3)
    for step in (3, STEPS):
        sync, asyn = _weights(d / "sync", step), _weights(d / "async", step)
        assert sync.keys() == asyn.keys()
        for name in sync:
            torch.testing.assert_close(asyn[name], sync[name], rtol=1e-2, atol=1e-3, msg=f"step {step}: {name}")


def test_resume_on_the_gpu_continues_the_run(runs, shards):
    d = runs["dir"]
    resumed = d / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(d / "sync" / "checkpoints" / "global_step3", resumed / "checkpoints" / "global_step3")
    (resumed / "checkpoints" / "latest").write_text("global_step3")
    train(resumed, shards, "checkpoint.async_save=false")
    losses = step_losses(resumed)
    assert sorted(losses) == [4, 5, 6]  # loaded: it started at step 4, not from scratch
    want = {s: v for s, v in step_losses(d / "sync").items() if s > 3}
    assert losses == pytest.approx(want, rel=2e-3)
    final, reference = _weights(resumed, STEPS), _weights(d / "sync", STEPS)
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=1e-2, atol=1e-3, msg=name)


def test_to_hf_then_kv_cache_generation_on_the_gpu_equals_transformers(runs):
    transformers = pytest.importorskip("transformers")
    from megalm.inference.generate import Sampling, generate
    from megalm.inference.load import load_model

    hf_dir = runs["dir"] / "hf"
    run("tools/convert_checkpoint.py", "to-hf", "--checkpoint", str(runs["dir"] / "sync" / "checkpoints"),
        "--output", str(hf_dir))
    model, codec = load_model(None, str(hf_dir), "cuda")
    assert next(model.parameters()).is_cuda
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    prompts = ["the model", "a device saves", "every step the"]
    ids = [codec.encode(p) for p in prompts]
    tokens = torch.tensor([ids[0]], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model.logits_full(tokens).float(), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    got = generate(model, ids, 24, Sampling(greedy=True), eod=codec.eod, pad=codec.pad).tokens
    for p, ours in zip(ids, got, strict=True):
        want = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False,
                           pad_token_id=codec.pad)[0, len(p):].tolist()
        want = want[: want.index(codec.eod) + 1] if codec.eod in want else want
        assert ours == want
    cli = run("tools/generate.py", "--hf", str(hf_dir), "--prompt", "the model", "--greedy", "--max-new-tokens", "16",
              "--json")
    line = json.loads(cli.stdout.splitlines()[0])
    assert line["tokens"] == got[0][:16]
