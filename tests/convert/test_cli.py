"""The tools as a user runs them: outputs, and one `error: ...` line with exit code 2 for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def run_tool(tool, *args):
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300)


def _user_error(r, fragment):
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_user_errors_exit_2(tmp_path):
    _user_error(run_tool("convert_checkpoint", "to-hf", "--checkpoint", tmp_path / "nope", "--output", tmp_path / "o"),
                "does not exist")
    (tmp_path / "empty").mkdir()
    _user_error(run_tool("generate", "--checkpoint", tmp_path / "empty", "--prompt", "hi"), "not a megalm checkpoint")
    _user_error(run_tool("convert_checkpoint", "from-hf", "--hf", tmp_path / "empty", "--output", tmp_path / "r"),
                "not a Hugging Face model directory")


@pytest.mark.slow
def test_tools_on_a_checkpoint(checkpoints, convert_shards, tmp_path):
    run = checkpoints["gpt2_pp2"]
    r = run_tool("convert_checkpoint", "to-hf", "--checkpoint", run / "checkpoints", "--output", tmp_path / "hf")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["max_abs_logit_diff"] < 1e-4 and summary["step"] == 3
    _user_error(run_tool("convert_checkpoint", "to-hf", "--checkpoint", run, "--output", tmp_path / "hf"),
                "not empty")

    r = run_tool("generate", "--checkpoint", run, "--prompt", "Once upon a time", "--prompt", "x",
                 "--max-new-tokens", "50", "--temperature", "0.8", "--top-k", "40", "--seed", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Once upon a time") and "tokens/s" in r.stderr
    again = run_tool("generate", "--hf", tmp_path / "hf", "--prompt", "Once upon a time", "--prompt", "x",
                     "--max-new-tokens", "50", "--temperature", "0.8", "--top-k", "40", "--seed", "1")
    assert again.stdout == r.stdout  # same model, same seed: the HF export generates the same text

    r = run_tool("evaluate", "--checkpoint", run, "--data-prefix", convert_shards, "--max-tokens", "4000",
                 "--seq-len", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["windows"] == 4000 // 33 and abs(res["perplexity"] - 2.718281828 ** res["loss"]) < 1e-6 * res["perplexity"]
    assert 0 < res["loss"] < 5.6  # trained a little: below a uniform guess (ln 257 = 5.55) or close to it
