"""Export to Hugging Face from every layout: no missing keys, logits equal, greedy generation equal."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # trains the session checkpoints (~30 s) on first use


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    from megalm.convert.hf import to_hf

    out = {}
    for name, run in checkpoints.items():
        d = tmp_path_factory.mktemp("hf") / name
        out[name] = (d, to_hf(run, d))
    return out


@pytest.mark.parametrize("name", ["llama_tp2_pp2", "llama_tp2_z3", "gpt2_pp2"])
def test_export_loads_and_logits_match(name, exports, checkpoints):
    from megalm.convert.reader import open_checkpoint, read_state
    from megalm.inference.load import build_gpt

    out, summary = exports[name]
    assert summary["weights_from"] == "fp32 master weights"
    assert summary["max_abs_logit_diff"] < 1e-4
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)  # safetensors only
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(hf).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM")
    ckpt = open_checkpoint(checkpoints[name])
    state, _ = read_state(ckpt)
    ours = build_gpt(ckpt.config.model, state)
    assert hf.config.vocab_size == 257 and hf.config.eos_token_id == 256  # padding stripped; eos = EOD
    tokens = torch.randint(0, 257, (3, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (hf.eval()(tokens).logits - ours.logits_full(tokens)).abs().max().item()
    assert diff < 1e-4
    # the exported weights are the fp32 masters (differ from a bf16 run's rounded module weights)
    assert torch.equal(hf.get_input_embeddings().weight, state["embedding.word.weight"])


def test_tied_and_untied_heads(exports):
    tied = json.loads((exports["llama_tp2_z3"][0] / "config.json").read_text())
    untied = json.loads((exports["llama_tp2_pp2"][0] / "config.json").read_text())
    assert tied["tie_word_embeddings"] is True and untied["tie_word_embeddings"] is False
    assert untied["num_key_value_heads"] == 2 and untied["num_attention_heads"] == 4


@pytest.mark.parametrize("name", ["llama_tp2_pp2", "gpt2_pp2"])
def test_greedy_generation_equals_hugging_face(name, exports, checkpoints):
    from megalm.inference.generate import Sampling, generate
    from megalm.inference.load import load_from_checkpoint

    model, codec = load_from_checkpoint(checkpoints[name])
    hf = transformers.AutoModelForCausalLM.from_pretrained(exports[name][0], dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(exports[name][0])
    prompts = ["Once upon a time", "The", "def f(x):\n    return x"]
    ids = [codec.encode(p) for p in prompts]
    assert ids == [tok.encode(p, add_special_tokens=False) for p in prompts]
    ours = generate(model, ids, 24, Sampling(greedy=True), eod=codec.eod, pad=codec.pad).tokens
    for p, got in zip(ids, ours, strict=True):
        want = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, pad_token_id=codec.pad)[0, len(p):]
        want = want.tolist()
        want = want[: want.index(256) + 1] if 256 in want else want
        assert got == want


def test_bf16_export_and_sharded_index(checkpoints, tmp_path):
    from megalm.convert.hf import to_hf

    summary = to_hf(checkpoints["llama_tp2_pp2"], tmp_path / "hf", dtype="bf16", max_shard_size="100KB")
    assert summary["max_abs_logit_diff"] < 1e-4
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert hf.dtype == torch.bfloat16 and not info["missing_keys"] and not info["unexpected_keys"]


def test_subset_verification_compares_the_first_blocks_and_catches_a_wrong_layer(checkpoints, tmp_path):
    # a model too large to hold twice is checked on its first blocks (transformers reads only those)
    from safetensors.torch import load_file, save_file

    from megalm.convert.hf import LazyState, to_hf, verify_hf
    from megalm.convert.reader import CheckpointReader, open_checkpoint

    out = tmp_path / "hf"
    summary = to_hf(checkpoints["llama_tp2_pp2"], out, verify_layers=1)
    assert summary["verified"] == "blocks 0-0 of 2" and summary["max_abs_logit_diff"] < 1e-4
    ckpt = open_checkpoint(checkpoints["llama_tp2_pp2"])
    state = LazyState(CheckpointReader(ckpt))
    tensors = load_file(str(out / "model.safetensors"))
    for key in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):  # block 0 holding block 1's weights
        tensors[f"model.layers.0.{key}"] = tensors[f"model.layers.1.{key}"].clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    diff, verified = verify_hf(out, state, ckpt.config.model, torch.float32, layers=1)
    assert verified == "blocks 0-0 of 2" and diff > 1e-3


@pytest.mark.parametrize("reset", [False, True], ids=["positions-run-on", "positions-restart"])
def test_a_document_masked_run_exports_and_scores_one_document_as_it_does(reset, convert_shards, trainer, tmp_path):
    # trained with model.document_mask, run through to-hf, loaded by transformers: on one document
    # (the only thing a plain causal model can be asked) its logits are the masked model's
    from megalm.convert.hf import to_hf
    from megalm.convert.reader import open_checkpoint, read_state
    from megalm.inference.load import build_gpt

    run = tmp_path / "run"
    trainer(run, 1, [f"data.train_prefixes=[{convert_shards}]", "model.document_mask=true",
                     f"model.document_positions={str(reset).lower()}", "train.precision=fp32"])
    ckpt = open_checkpoint(run)
    assert ckpt.config.model.document_mask and ckpt.config.model.document_positions is reset
    summary = to_hf(run, tmp_path / "hf")
    assert summary["max_abs_logit_diff"] < 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = build_gpt(ckpt.config.model, read_state(ckpt)[0])
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))  # no EOD: one document
    with torch.no_grad():
        masked = ours(tokens, positions=torch.arange(48).expand(2, 48), documents=torch.zeros(2, 48, dtype=torch.long))
        assert (hf(tokens).logits - masked[..., :257]).abs().max().item() < 1e-4
