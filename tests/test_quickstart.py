"""The README's main job, shortened, from a non-editable install run outside the repository: every
stage runs, validation loss falls, the export loads in transformers and generates, and a second run
reuses the finished stages."""

import json
import shutil
import subprocess
import sys

import pytest

from megalm.testing.runs import REPO, train_env


def _install_copy(tmp_path) -> dict[str, str]:
    """`pip install --target` of a copy of the sources (no editable finder, no repository configs/):
    the environment that imports megalm from there."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "megalm", src / "megalm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md", "pyproject.toml"):
        shutil.copy2(REPO / name, src / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
                    "--target", str(target), str(src)], check=True, capture_output=True, timeout=300)
    env = train_env(PYTHONPATH=str(target))
    where = subprocess.run([sys.executable, "-c", "import megalm.cli.quickstart as q; print(q.__file__, q.CONFIG)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(str(target)) and where[1].startswith(str(target)), where  # not the repository
    return env


@pytest.mark.slow
def test_quickstart_end_to_end_and_reuse(tmp_path):
    env = _install_copy(tmp_path)
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "megalm.cli.quickstart", "--out", str(out), "--vocab-size", "1024",
           "train.steps=60", "train.eval_interval=20", "train.log_interval=10", "checkpoint.interval=0"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
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

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing") == 3  # tokenizer, shards, training
