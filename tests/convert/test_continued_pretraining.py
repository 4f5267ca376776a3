"""Continued pretraining end to end, as the README walks it: a transformers-made model directory
with its own transformers-made tokenizer (Llama 3's <|end_of_text|>, Qwen's <|endoftext|> and an
embedding larger than the tokenizer), from-hf at TP2, preprocess with that tokenizer.json, train at
TP2 through the torchrun launcher from the converted weights (checkpoint.load), to-hf, generate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

FAMILIES = {  # family: (end-of-text token, its other special tokens, model vocabulary beyond the tokenizer)
    "llama": ("<|end_of_text|>", ["<|begin_of_text|>"], 0),
    "qwen2": ("<|endoftext|>", ["<|im_start|>", "<|im_end|>"], 20),
}


def _corpus(path) -> list[str]:
    import pydoc_data.topics

    texts = [t.strip() for _, text in sorted(pydoc_data.topics.topics.items()) for t in text.split("\n\n")
             if len(t.strip()) > 40][:400]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def _write_model(family: str, out, texts: list[str]) -> int:
    """A byte-level BPE trained on `texts` (transformers' fast tokenizer, saved as a model's is) and
    a tiny `family` model over its vocabulary; the end-of-text id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    eot, specials, extra = FAMILIES[family]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=[*specials, eot],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eot, pad_token=eot)
    tok.save_pretrained(out)
    vocab, eot_id = len(tok) + extra, tok.convert_tokens_to_ids(eot)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, eos_token_id=eot_id, pad_token_id=eot_id,
                  bos_token_id=None, tie_word_embeddings=family == "qwen2")
    config = (transformers.LlamaConfig(**common, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}) if family == "llama" else transformers.Qwen2Config(**common))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return eot_id


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    from megalm.testing.runs import REPO, train_env

    r = subprocess.run(list(args), cwd=REPO, env=train_env(**env), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


@pytest.mark.parametrize("family", FAMILIES)
def test_continued_pretraining_from_a_transformers_model_and_back(tmp_path, family):
    from megalm.data.meta import read_meta
    from megalm.testing.runs import hf_loss_on_first_batch, step_losses

    texts = _corpus(tmp_path / "corpus.jsonl")
    hf, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
    eot_id = _write_model(family, hf, texts)
    py = sys.executable
    _run(py, "tools/convert_checkpoint.py", "from-hf", "--hf", str(hf), "--output", str(run), "--tp", "2",
         "train.precision=fp32", "train.micro_batch_size=4", "train.global_batch_size=8", "data.seq_len=64",
         "checkpoint.interval=0", "train.eval_interval=0", "logging.tensorboard=false")
    _run(py, "tools/preprocess_data.py", "--input", str(tmp_path / "corpus.jsonl"), "--tokenizer-type", "hf",
         "--tokenizer-model", str(run / "tokenizer" / "tokenizer.json"), "--output-prefix", str(tmp_path / "docs"),
         "--append-eod")
    assert read_meta(str(tmp_path / "docs"))["tokenizer"]["eod"] == eot_id  # the model's own end of text
    _run("torchrun", "--standalone", "--nproc_per_node", "2", "-m", "megalm.train", "--config", str(run / "config.yaml"),
         f"data.train_prefixes=[{tmp_path / 'docs'}]", "train.steps=4", "checkpoint.load=auto", "data.num_workers=0")
    losses = step_losses(run)
    assert sorted(losses) == [1, 2, 3, 4]
    # step 1 trained the converted weights: its loss is transformers' on the same batch
    assert abs(losses[1] - hf_loss_on_first_batch(hf, run, str(tmp_path / "docs"))) <= 1e-5 * losses[1]
    r = _run(py, "tools/convert_checkpoint.py", "to-hf", "--checkpoint", str(run), "--output", str(out))
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["eos_token_id"] == eot_id
    assert config["vocab_size"] == json.loads((hf / "config.json").read_text())["vocab_size"]
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == FAMILIES[family][0]
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    texts = {}
    for source in (["--hf", str(out)], ["--checkpoint", str(run)]):
        r = _run(py, "tools/generate.py", *source, "--prompt", "The for statement", "--max-new-tokens", "12", "--greedy")
        texts[source[0]] = r.stdout
    assert texts["--hf"] == texts["--checkpoint"] and "The for statement" in texts["--hf"]
