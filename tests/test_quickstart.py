"""The README's main job, shortened: every stage runs, validation loss falls, the export loads in
transformers and generates, and a second run reuses the finished stages."""

import json
import subprocess
import sys

import pytest

from megalm.testing.runs import REPO, train_env


@pytest.mark.slow
def test_quickstart_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "megalm.quickstart", "--out", str(out), "--vocab-size", "1024",
           "train.steps=60", "train.eval_interval=20", "train.log_interval=10", "checkpoint.interval=0"]
    r = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [x["val_loss"] for x in rows if "val_loss" in x]
    assert len(val) == 3 and val[-1] < val[0] - 0.5, val  # validation loss clearly falls
    assert (out / "run" / "loss_curve.png").stat().st_size > 10_000
    assert any((out / "run" / "tensorboard").iterdir())
    assert "Once upon a time" in r.stdout and "validation perplexity:" in r.stdout
    ppl = float(r.stdout.split("validation perplexity:")[1].split()[0])
    assert abs(ppl - 2.718281828 ** val[-1]) / ppl < 1e-3
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    again = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing") == 3  # tokenizer, shards, training
