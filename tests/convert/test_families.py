"""Each Hugging Face family (megalm.convert.families) in and out, proven on a tiny model that
transformers itself writes (seed 0, every tensor drawn at random, norms and biases included, so a
swapped or dropped tensor changes the logits):

- from-hf at TP2 x PP2 and to-hf back: the family's own class and model_type, its config fields
  (rope parameters, biases, head_dim, window, eps, tying: an epsilon or rope base lost on the way
  shows), every tensor bitwise, the tokenizer; megalm's logits from the TP2 x PP2 checkpoint equal
  transformers' (fp32, 1e-4) and greedy generation is the same (Mistral's past its window);
- the training path: after from-hf at TP2 and at PP2 the trainer's first loss equals transformers'
  loss on the same batch (fp32, 1e-5);
- what megalm cannot convert is one line and nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

LLAMA_LIKE = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=None,
                  eos_token_id=256, pad_token_id=256)
THETA_1M = {"rope_type": "default", "rope_theta": 1e6}
CONFIGS = {  # each family's own features, at values no default would produce
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE, head_dim=32, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_LIKE, tie_word_embeddings=True, rope_parameters=THETA_1M),
    "qwen3": lambda: transformers.Qwen3Config(**LLAMA_LIKE, head_dim=32, tie_word_embeddings=False, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_LIKE, sliding_window=8, tie_word_embeddings=False,
                                                  rope_parameters=THETA_1M),
    "mixtral": lambda: transformers.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2,
                                                  tie_word_embeddings=False, rope_parameters=THETA_1M),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                                     norm_topk_prob=True, tie_word_embeddings=False,
                                                     rope_parameters=THETA_1M),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**LLAMA_LIKE, head_dim=32, num_experts=4, num_experts_per_tok=3,
                                                     moe_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[0],
                                                     tie_word_embeddings=False, rope_parameters=THETA_1M),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=257, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=256,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=256,
                                            eos_token_id=256, pad_token_id=256),
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM",
           "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
IGNORED_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "bos_token_id", "pad_token_id",
                       "eos_token_id", "use_cache", "architectures", "output_attentions", "output_hidden_states",
                       "return_dict"}
"""Fields the model's tensors do not depend on (the special ids are the tokenizer's, checked apart)."""


def write_tiny(family: str, out, **fields) -> None:
    """A transformers-made model of `family` (its config with `fields` set) with the byte tokenizer:
    every parameter random (norm weights around 1)."""
    from megalm.convert.hf_tokenizer import export_tokenizer
    from megalm.data.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    config = CONFIGS[family]()
    for key, value in fields.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = p.dim() == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight")
            p.copy_(1 + 0.2 * torch.randn_like(p) if norm else 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    export_tokenizer(ByteTokenizer(), out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for family in CONFIGS:
        write_tiny(family, root / family)
    return root


def convert(*args: str) -> subprocess.CompletedProcess:
    from megalm.testing.runs import REPO, train_env

    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args], env=train_env(),
                          capture_output=True, text=True, timeout=600)


def _config_fields(hf_dir, like: dict | None = None) -> dict:
    """config.json's fields; rope_parameters only with the keys `like`'s has (megalm writes each
    rope type's parameters out, transformers' defaults included)."""
    fields = {k: v for k, v in json.loads((hf_dir / "config.json").read_text()).items() if k not in IGNORED_CONFIG_KEYS}
    if like and "rope_parameters" in like:
        fields["rope_parameters"] = {k: fields["rope_parameters"][k] for k in like["rope_parameters"]}
    return fields


@pytest.mark.parametrize("family", CONFIGS)
def test_a_family_goes_in_at_tp2_pp2_and_comes_out_the_same(tiny, tmp_path, family):
    from megalm.inference.generate import Sampling, generate
    from megalm.inference.load import load_from_checkpoint

    x, run, y = tiny / family, tmp_path / "run", tmp_path / "y"
    r = convert("from-hf", "--hf", str(x), "--output", str(run), "--tp", "2", "--pp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = convert("to-hf", "--checkpoint", str(run), "--output", str(y))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["max_abs_logit_diff"] < 1e-4  # transformers on the export
    written = json.loads((y / "config.json").read_text())
    assert written["model_type"] == family and written["architectures"] == [CLASSES[family]]
    assert _config_fields(y, _config_fields(x)) == _config_fields(x)  # eps, rope base and scaling, head_dim, window, biases, tying
    a, b = load_file(str(x / "model.safetensors")), load_file(str(y / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (x / "tokenizer.json").read_bytes() == (y / "tokenizer.json").read_bytes()

    # megalm's model from the TP2 x PP2 checkpoint against the transformers model the test wrote
    ours, _ = load_from_checkpoint(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(x, dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours.logits_full(tokens) - theirs(tokens).logits).abs().max().item() < 1e-4
    prompt = tokens[:1, :5]
    mine = generate(ours, prompt.tolist(), 40, Sampling(greedy=True), eod=None).tokens[0]
    theirs.generation_config.eos_token_id = None  # 40 tokens, end-of-text or not, as megalm's with eod=None
    with torch.no_grad():
        hf = theirs.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=256)[0, 5:].tolist()
    assert len(hf) == 40
    assert mine == hf


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("family", CONFIGS)
def test_the_first_training_step_after_from_hf_has_transformers_loss(tiny, tmp_path, convert_shards, trainer, family,
                                                                      layout):
    from megalm.convert.hf import from_hf
    from megalm.testing.runs import hf_loss_on_first_batch

    run = tmp_path / "run"
    tensor, pipeline = (2, 1) if layout == "tp2" else (1, 2)
    from_hf(tiny / family, run, tensor=tensor, pipeline=pipeline, overrides=[
        "train.precision=fp32", "zero.stage=1", "train.micro_batch_size=2", "train.global_batch_size=4"])
    losses = trainer(run, 2, [f"data.train_prefixes=[{convert_shards}]", "train.steps=1", "checkpoint.load=auto",
                              "checkpoint.save_at_end=false"], config=str(run / "config.yaml"))
    expected = hf_loss_on_first_batch(tiny / family, run, convert_shards)
    assert abs(losses[0] - expected) <= 1e-5 * expected, (losses[0], expected)


@pytest.mark.parametrize(("family", "fields", "written", "message"), [
    ("llama", {}, {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 16,
                                       "long_factor": [1.0] * 16}}, "rope scaling longrope"),
    ("llama", {}, {"model_type": "gemma2", "final_logit_softcapping": 30.0}, "logit soft-capping"),
    ("llama", {}, {"model_type": "phi3"}, "model_type 'phi3' is not supported: megalm converts llama, gpt2, qwen2"),
    ("llama", {"attention_bias": True}, {}, "attention/MLP biases"),
    ("qwen2", {}, {"use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"]},
     "sliding-window attention on some layers"),
    ("llama", {"vocab_size": 200, "pad_token_id": 0, "eos_token_id": 0}, {},
     "the tokenizer's 257 ids do not fit the model's vocabulary of 200"),
    ("llama", {}, {"vocab_size": 300}, "do not match its config"),
])
def test_what_megalm_cannot_convert_is_one_line_and_nothing_written(tmp_path, family, fields, written, message):
    # `fields`: the model transformers writes has them; `written`: config.json says them afterwards
    x = tmp_path / "x"
    write_tiny(family, x, **fields)
    (x / "config.json").write_text(json.dumps({**json.loads((x / "config.json").read_text()), **written}))
    r = convert("from-hf", "--hf", str(x), "--output", str(tmp_path / "run"), "--tp", "2")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_moe_family_goes_in_at_expert_parallel_and_trains_with_transformers_loss(tiny, tmp_path, convert_shards,
                                                                                   trainer, family):
    # from-hf --dp 2 --ep 2: each rank's experts are its expert rank's half; the first step's loss is transformers'
    from megalm.convert.hf import from_hf
    from megalm.testing.runs import hf_loss_on_first_batch

    run = tmp_path / "run"
    from_hf(tiny / family, run, data_parallel=2, expert=2, overrides=[
        "train.precision=fp32", "zero.stage=1", "train.micro_batch_size=2", "train.global_batch_size=4"])
    assert sorted(p.name for p in (run / "checkpoints" / "global_step0").glob("experts_*")) == [
        "experts_ep00_mp_rank_00.pt", "experts_ep01_mp_rank_00.pt"]
    losses = trainer(run, 2, [f"data.train_prefixes=[{convert_shards}]", "train.steps=1", "checkpoint.load=auto",
                              "checkpoint.save_at_end=false"], config=str(run / "config.yaml"))
    expected = hf_loss_on_first_batch(tiny / family, run, convert_shards)
    assert abs(losses[0] - expected) <= 1e-5 * expected, (losses[0], expected)
