"""from-hf (bitwise round trip, resumed by the trainer) and reshard (same loss at a new layout)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def _next_loss(train_run, run_dir, world, prefix, step):
    """Resume `run_dir` for one step with the trainer; the loss of that step (before its update)."""
    losses = train_run(run_dir, world, [f"data.train_prefixes=[{prefix}]", f"train.steps={step}",
                                        "checkpoint.load=auto", "checkpoint.save_at_end=false"],
                       config=str(run_dir / "config.yaml"))
    return losses[-1]


def test_from_hf_round_trip_is_bitwise_and_training_resumes(checkpoints, convert_shards, trainer, tmp_path):
    from megalm.convert.hf import from_hf, to_hf
    from megalm.convert.reader import open_checkpoint
    from megalm.testing.runs import hf_loss_on_first_batch

    x = tmp_path / "x"
    to_hf(checkpoints["llama_tp2_pp2"], x, verify=False)
    run = tmp_path / "run"
    ckpt = from_hf(x, run, tensor=1, pipeline=2, overrides=["train.precision=bf16", "zero.stage=1",
                                                                   "train.micro_batch_size=4", "train.global_batch_size=8"])
    meta = open_checkpoint(run).meta.to_dict()
    assert meta["parallel"] == {"tensor": 1, "pipeline": 2, "data": 1, "context": 1, "expert": 1} and meta["step"] == 0
    assert (run / "checkpoints" / "latest").read_text() == ckpt.name
    y = tmp_path / "y"
    to_hf(run, y)
    a, b = load_file(str(x / "model.safetensors")), load_file(str(y / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (x / "tokenizer.json").read_bytes() == (y / "tokenizer.json").read_bytes()
    # the trainer resumes it (bf16 masters were set exactly): its first loss is HF's on the same batch
    loss = _next_loss(trainer, run, 2, convert_shards, 1)
    assert abs(loss - hf_loss_on_first_batch(x, run, convert_shards)) < 2e-2  # bf16 forward


@pytest.mark.parametrize(("tp", "pp", "world"), [(1, 1, 1), (1, 2, 2)])
def test_reshard_keeps_the_loss(checkpoints, convert_shards, trainer, tmp_path, tp, pp, world):
    from megalm.convert.reader import open_checkpoint, read_state
    from megalm.convert.reshard import reshard
    from megalm.convert.universal import convert_to_universal

    src = tmp_path / "src"
    shutil.copytree(checkpoints["llama_tp2_pp2"], src)
    out = tmp_path / "out"
    reshard(src, out, tensor=tp, pipeline=pp)
    before, after = read_state(open_checkpoint(src))[0], read_state(open_checkpoint(out))[0]
    assert all(torch.equal(before[k], after[k]) for k in before)
    meta = open_checkpoint(out).meta.to_dict()
    assert meta["step"] == 3 and meta["consumed_samples"] == 24
    # the Adam moments and step moved with the weights: both universal forms are equal, bitwise
    ua, ub = convert_to_universal(src, tmp_path / "ua"), convert_to_universal(out, tmp_path / "ub")
    files = sorted(p.relative_to(ua) for p in ua.glob("zero/*/*.pt"))
    assert len(files) == 4 * len(before) and files == sorted(p.relative_to(ub) for p in ub.glob("zero/*/*.pt"))
    assert all(torch.equal(torch.load(ua / f)["param"], torch.load(ub / f)["param"]) for f in files)
    # step 5 follows an update that used the moments: equal to the TP2 PP2 run's step 5
    reference = _next_loss(trainer, src, 4, convert_shards, 5)
    resharded = _next_loss(trainer, out, world, convert_shards, 5)
    assert abs(resharded - reference) <= 1e-5 * abs(reference)


def test_reshard_zero3_bf16_to_pipeline(checkpoints, tmp_path):
    from megalm.convert.reader import open_checkpoint, read_state
    from megalm.convert.reshard import reshard
    from megalm.errors import MegalmError

    with pytest.raises(MegalmError, match="zero.stage"):
        reshard(checkpoints["llama_tp2_z3"], tmp_path / "bad", tensor=1, pipeline=2)
    reshard(checkpoints["llama_tp2_z3"], tmp_path / "ok", tensor=1, pipeline=2, overrides=["zero.stage=1"])
    a, b = read_state(open_checkpoint(checkpoints["llama_tp2_z3"]))[0], read_state(open_checkpoint(tmp_path / "ok"))[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_llama_with_llama3_rope_goes_in_at_tp2_pp2_and_out_unchanged(tmp_path):
    # model.rope_scaling (issue 22): from-hf keeps Llama 3.1's rope parameters, to-hf writes them back;
    # to-hf's own check compares megalm's logits with the exported transformers model's
    import json
    import subprocess
    import sys

    from megalm.convert.hf_tokenizer import export_tokenizer
    from megalm.data.tokenizer import ByteTokenizer
    from megalm.testing.runs import REPO, train_env

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_parameters=rope, tie_word_embeddings=False, bos_token_id=None,
                                   eos_token_id=256, pad_token_id=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "x")
    export_tokenizer(ByteTokenizer(), tmp_path / "x")
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    for args in (["from-hf", "--hf", str(tmp_path / "x"), "--output", str(tmp_path / "run"), "--tp", "2", "--pp", "2"],
                 ["to-hf", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "y")]):
        r = subprocess.run([*tool, *args], env=train_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["max_abs_logit_diff"] < 1e-4
    written = json.loads((tmp_path / "y" / "config.json").read_text())["rope_parameters"]
    assert {k: written[k] for k in rope} == rope
    a, b = load_file(str(tmp_path / "x" / "model.safetensors")), load_file(str(tmp_path / "y" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
