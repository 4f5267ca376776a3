"""megalm.json is one typed, versioned record: it round-trips, and an old, foreign or damaged file is
one clear line (for every reader: resume, to-hf, reshard, universal, generate, evaluate)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megalm.config import load_config
from megalm.errors import MegalmError
from megalm.parallel.dims import ParallelDims
from megalm.testing.runs import REPO, TINY, train_env
from megalm.training.checkpoint_meta import FORMAT_VERSION, CheckpointMeta, TrainState


def _meta(tensor: int = 2) -> CheckpointMeta:
    cfg = load_config(TINY, [f"parallel.tensor={tensor}"]).validate(2 * tensor)
    return CheckpointMeta.of_run(cfg, ParallelDims(tensor=tensor, pipeline=1, data=2), TrainState(10, 80, 1),
                                 {"type": "byte", "vocab_size": 257})


def test_round_trip_through_json(tmp_path):
    meta = _meta()
    (tmp_path / "megalm.json").write_text(json.dumps(meta.to_dict()))
    back = CheckpointMeta.read(tmp_path)
    assert back.to_dict() == meta.to_dict() and back.format_version == FORMAT_VERSION
    assert back.dims == ParallelDims(tensor=2, pipeline=1, data=2) and back.state == TrainState(10, 80, 1)
    assert back.config.to_dict() == meta.config.to_dict() and back.config.parallel.tensor == 2
    assert back.describe() == "tensor 2, pipeline 1, data 2, step 10"
    assert meta.to_dict()["world_size"] == 4


@pytest.mark.parametrize("content, message", [
    ({"step": 3, "parallel": {"tensor": 1}}, "not megalm checkpoint metadata \\(no format_version\\)"),
    ([1, 2], "not megalm checkpoint metadata"),
    ({"format_version": FORMAT_VERSION + 1}, f"metadata format {FORMAT_VERSION + 1}; this megalm .* reads format"),
    ({"format_version": FORMAT_VERSION, "step": 1}, "missing or malformed field .*damaged"),
    ("{truncated", "is not valid JSON"),
])
def test_old_foreign_or_damaged_metadata_is_one_clear_error(tmp_path, content, message):
    text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / "megalm.json").write_text(text)
    with pytest.raises(MegalmError, match=message):
        CheckpointMeta.read(tmp_path)
    with pytest.raises(MegalmError, match="has no megalm.json"):
        CheckpointMeta.read(tmp_path / "elsewhere")


@pytest.mark.parametrize("tool", [["convert_checkpoint.py", "to-hf", "--output", "OUT"],
                                  ["convert_checkpoint.py", "reshard", "--output", "OUT"],
                                  ["convert_checkpoint.py", "universal", "--output", "OUT"],
                                  ["generate.py", "--prompt", "x"],
                                  ["evaluate.py", "--text-file", "OUT"]])
def test_tools_on_a_foreign_checkpoint_print_one_line(tmp_path, tool):
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "global_step5").mkdir(parents=True)
    (ckpt / "global_step5" / "megalm.json").write_text(json.dumps({"step": 5}))
    (ckpt / "latest").write_text("global_step5")
    args = [a.replace("OUT", str(tmp_path / "out")) for a in tool]
    r = subprocess.run([sys.executable, f"tools/{args[0]}", *args[1:], "--checkpoint", str(ckpt)], cwd=REPO,
                       env=train_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"error: {ckpt / 'global_step5' / 'megalm.json'} is not megalm checkpoint metadata (no format_version): "
        "the checkpoint was not written by megalm, or by a megalm older than 0.1.0"]
    assert not (tmp_path / "out").exists()


def test_resuming_from_a_foreign_checkpoint_prints_one_line(tmp_path, byte_shards):
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "global_step5").mkdir(parents=True)
    (ckpt / "global_step5" / "megalm.json").write_text(json.dumps({"step": 5}))
    (ckpt / "latest").write_text("global_step5")
    r = subprocess.run([sys.executable, "-m", "megalm.train", "--config", "configs/tiny.yaml",
                        f"train.run_dir={tmp_path / 'run'}", f"data.train_prefixes=[{byte_shards}]"], cwd=REPO,
                       env=train_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {ckpt / 'global_step5' / 'megalm.json'} is not megalm checkpoint metadata (no format_version): "
        "the checkpoint was not written by megalm, or by a megalm older than 0.1.0")
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


class _RunsCode:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_file_whose_pickle_would_run_code_is_refused(tmp_path):
    import torch

    ckpt = tmp_path / "run" / "checkpoints" / "global_step5"
    ckpt.mkdir(parents=True)
    (ckpt / "megalm.json").write_text(json.dumps(_meta(tensor=1).to_dict()))
    marker = tmp_path / "code-ran"
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt.parent / "latest").write_text("global_step5")
    for tool in (["convert_checkpoint.py", "to-hf", "--output", str(tmp_path / "hf")], ["generate.py", "--prompt", "x"]):
        r = subprocess.run([sys.executable, f"tools/{tool[0]}", *tool[1:], "--checkpoint", str(ckpt.parent)],
                           cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and not marker.exists(), r.stderr[-2000:]
        assert r.stderr.strip().splitlines() == [
            f"error: {ckpt / 'mp_rank_00_model_states.pt'} holds a pickled posix.system, which is not among the types "
            "DeepSpeed writes: refusing to load it (unpickling it could run code)"]
    assert not (tmp_path / "hf").exists()


def test_deepspeed_objects_in_the_allowlist_load(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from megalm import seams

    torch.save({"scaler": LossScaler(1.0), "w": torch.ones(3)}, tmp_path / "f.pt")
    loaded = seams.load_deepspeed_file(tmp_path / "f.pt")
    assert isinstance(loaded["scaler"], LossScaler) and torch.equal(loaded["w"], torch.ones(3))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "f.pt").read_bytes()[:200])
    with pytest.raises(MegalmError, match="cut.pt cannot be read .*damaged or truncated"):
        seams.load_deepspeed_file(tmp_path / "cut.pt")


def test_a_planted_pickle_in_a_trained_checkpoint_runs_nothing_anywhere(byte_shards, tmp_path):
    # issue 25: a real checkpoint whose model file carries a pickled os.system call, its manifest
    # rewritten to match: training's resume, reshard, universal, to-hf, generate and evaluate each
    # refuse it in the converters' one line, exit 2, and the command never runs
    import torch

    from megalm.training import manifest

    run_dir = tmp_path / "run"
    overrides = [f"data.train_prefixes=[{byte_shards}]", "train.steps=2", "train.global_batch_size=2",
                 "train.micro_batch_size=1", "train.eval_interval=0", "logging.tensorboard=false",
                 "checkpoint.save_at_end=true", f"train.run_dir={run_dir}"]
    r = subprocess.run([sys.executable, "-m", "megalm.train", "--config", TINY, *overrides], cwd=REPO, env=train_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = run_dir / "checkpoints" / "global_step2"
    model_file = ckpt / "mp_rank_00_model_states.pt"
    marker = tmp_path / "code-ran"
    state = torch.load(model_file, weights_only=False)  # the test's own file: trusted
    state["payload"] = _RunsCode(marker)
    torch.save(state, model_file)
    manifest.record(ckpt)  # the manifest matches: only the unpickling can stop it
    refusal = (f"error: {model_file} holds a pickled posix.system, which is not among the types DeepSpeed writes: "
               "refusing to load it (unpickling it could run code)")
    commands = {
        "train": ["-m", "megalm.train", "--config", TINY, *overrides, "train.steps=4"],
        "reshard": ["tools/convert_checkpoint.py", "reshard", "--checkpoint", str(run_dir), "--output",
                    str(tmp_path / "resharded"), "--tp", "1", "--pp", "1"],
        "universal": ["tools/convert_checkpoint.py", "universal", "--checkpoint", str(run_dir), "--output",
                      str(tmp_path / "universal")],
        "to-hf": ["tools/convert_checkpoint.py", "to-hf", "--checkpoint", str(run_dir), "--output", str(tmp_path / "hf")],
        "generate": ["tools/generate.py", "--checkpoint", str(run_dir), "--prompt", "x"],
        "evaluate": ["tools/evaluate.py", "--checkpoint", str(run_dir), "--data-prefix", byte_shards, "--max-tokens", "256"],
    }
    for name, command in commands.items():
        r = subprocess.run([sys.executable, *command], cwd=REPO, env=train_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and not marker.exists(), (name, r.returncode, r.stderr[-3000:])
        assert r.stderr.strip().splitlines()[-1] == refusal, (name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (name, r.stderr[-3000:])
    assert [d for d in ("resharded", "universal", "hf") if (tmp_path / d).exists()] == []
    assert max(s for s in (r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                           if "loss" in r)) == 2  # training never went on
