import dataclasses

import pytest
import yaml

from megalm.config import Config, apply_overrides, config_from_dict, describe, load_config, parse_split
from megalm.errors import MegalmError

TINY = "configs/tiny.yaml"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_tiny_loads_and_validates():
    cfg = load_config(TINY).validate(world_size=1)
    assert cfg.model.arch == "llama"
    assert cfg.train.global_batch_size == cfg.train.micro_batch_size
    assert cfg.train.grad_accum_steps == 1
    assert cfg.data.cache_dir.endswith("data_cache")


def test_unknown_key_names_key_and_lists_valid(tmp_path):
    p = write(tmp_path, "model:\n  hiden_size: 64\n")
    with pytest.raises(MegalmError) as e:
        load_config(p)
    assert "model.hiden_size" in str(e.value) and "hidden_size" in str(e.value).split(";")[1]


def test_unknown_section(tmp_path):
    with pytest.raises(MegalmError, match="unknown section 'modle'"):
        load_config(write(tmp_path, "modle: {}\n"))


def test_duplicate_key_is_error(tmp_path):
    with pytest.raises(MegalmError, match="duplicate key 'hidden_size' at line 3"):
        load_config(write(tmp_path, "model:\n  hidden_size: 64\n  hidden_size: 32\n"))
    with pytest.raises(MegalmError, match="duplicate key 'model'"):
        load_config(write(tmp_path, "model: {}\nmodel: {}\n"))


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("model:\n  hidden_size: big\n", "model.hidden_size", "int"),
        ("model:\n  hidden_size: 1.5\n", "model.hidden_size", "int"),
        ("model:\n  tie_embeddings: 3\n", "model.tie_embeddings", "bool"),
        ("zero:\n  stage: 4\n", "zero.stage", "one of [0, 1, 2, 3]"),
        ("optimizer:\n  betas: 0.9\n", "optimizer.betas", "list"),
        ("train:\n  precision: bf32\n", "train.precision", "one of"),
    ],
)
def test_wrong_type_names_key_and_type(tmp_path, text, key, expected):
    with pytest.raises(MegalmError) as e:
        load_config(write(tmp_path, text))
    assert key in str(e.value) and expected in str(e.value)


def test_overrides_coerce_types():
    cfg = load_config(
        TINY,
        [
            "parallel.tensor=2",
            "optimizer.lr=1e-3",  # YAML 1.1 reads this as a string; coerced to float
            "optimizer.betas=[0.8,0.9]",
            "model.tie_embeddings=true",
            "data.train_prefixes=[a,[2,b]]",
            "train.run_dir=/tmp/x",
        ],
    )
    assert cfg.parallel.tensor == 2
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == [0.8, 0.9]
    assert cfg.model.tie_embeddings is True
    assert cfg.data.train_prefixes == ["a", [2, "b"]]
    assert cfg.train.run_dir == "/tmp/x"


def test_bad_overrides():
    with pytest.raises(MegalmError, match="section.key=value"):
        apply_overrides({}, ["tensor=2"])
    with pytest.raises(MegalmError, match="unknown section 'paralel'"):
        apply_overrides({}, ["paralel.tensor=2"])
    with pytest.raises(MegalmError, match="parallel.tensor: expected int"):
        load_config(TINY, ["parallel.tensor=two"])


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(TINY, ["parallel.tensor=2", "train.global_batch_size=16"]).validate(world_size=4)
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(p)
    assert again == cfg
    assert again.validate(world_size=4) == cfg  # validate is idempotent on a resolved config


def test_derived_batch_values():
    cfg = load_config(TINY, ["parallel.tensor=2", "train.global_batch_size=32"]).validate(world_size=8)
    # data parallel = 8 / 2 = 4; accum = 32 / (4 micro x 4 dp) = 2
    assert cfg.data_parallel == 4
    assert cfg.train.grad_accum_steps == 2


def test_inconsistent_batch_has_fix_in_message():
    with pytest.raises(MegalmError, match=r"multiple of micro_batch_size x data-parallel size = 4 x 2 = 8"):
        load_config(TINY, ["train.global_batch_size=12"]).validate(world_size=2)
    with pytest.raises(MegalmError, match="grad_accum_steps"):
        load_config(TINY, ["train.global_batch_size=16", "train.grad_accum_steps=3"]).validate(world_size=2)


def test_tokens_define_steps():
    cfg = load_config(TINY, ["train.steps=0", "train.tokens=10000"]).validate(world_size=1)
    assert cfg.train.steps == -(-10000 // (4 * 64))
    with pytest.raises(MegalmError, match="set train.steps or train.tokens"):
        load_config(TINY, ["train.steps=0"]).validate(world_size=1)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.pipeline=2", "zero.stage=2"], 2, "supports ZeRO 0 and 1 only"),
        (["parallel.pipeline=2", "zero.stage=0", "train.precision=bf16"], 2, "fail to reload"),
        (["parallel.tensor=4"], 4, "num_kv_heads \\(2\\) must divide by parallel.tensor \\(4\\)"),
        (["parallel.tensor=2"], 3, "world size 3 is not divisible by tensor x pipeline = 2 x 1 = 2"),
        (["model.num_heads=3"], 1, "hidden_size \\(64\\) must divide by model.num_heads"),
        (["zero.stage=0", "zero.offload_optimizer=true"], 1, "offload_optimizer needs"),
        (["data.seq_len=128"], 1, "data.seq_len"),
        (["data.tokenizer_type=sentencepiece"], 1, "needs data.tokenizer_model"),
        (["data.split=98,1"], 1, None),
        (["data.split=a,b,c"], 1, "data.split"),
        (["data.train_prefixes=[[0,a]]"], 1, "train_prefixes\\[0\\]"),
        (["schedule.warmup_steps=100"], 1, "warmup_steps"),
    ],
)
def test_validation_errors(overrides, world, message):
    cfg = load_config(TINY, overrides)
    if message is None:
        cfg.validate(world)  # accepted
        return
    with pytest.raises(MegalmError, match=message):
        cfg.validate(world)


def test_model_defaults_derived():
    cfg = config_from_dict({"model": {"arch": "gpt2", "hidden_size": 768, "num_heads": 12}, "train": {"steps": 1}})
    cfg.validate(1)
    assert cfg.model.ffn_hidden_size == 3072 and cfg.model.tie_embeddings is True
    assert cfg.model.num_kv_heads == 12
    cfg = config_from_dict({"model": {"hidden_size": 4096, "num_heads": 32}, "train": {"steps": 1}}).validate(1)
    assert cfg.model.ffn_hidden_size == 11008  # Llama-7B's width
    assert cfg.model.tie_embeddings is False


def test_parse_split():
    assert parse_split("98,1,1") == pytest.approx([0.98, 0.01, 0.01])
    assert parse_split("9,1") == pytest.approx([0.9, 0.1, 0.0])


def test_every_field_documented():
    docs = describe()
    for name, section in dataclasses.asdict(Config()).items():
        missing = set(section) - set(docs[name])
        assert not missing, f"undocumented keys in {name}: {missing}"


def test_every_config_file_key_exists():
    # every shipped YAML file loads strictly (no stale keys) and each value lands in its key
    from megalm.config.loading import PRESETS

    paths = sorted(PRESETS.glob("*.yaml"))
    assert len(paths) >= 9, paths
    for path in paths:
        raw = yaml.safe_load(path.read_text())
        loaded = config_from_dict(raw, str(path)).to_dict()
        for section, keys in raw.items():
            for key, value in keys.items():
                got = loaded[section][key]
                assert got == value or (isinstance(value, str) and got == float(value)), (path.name, section, key)


def test_config_reference_is_current():
    from pathlib import Path

    from megalm.config import describe_markdown

    assert Path("docs/config.md").read_text() == describe_markdown() + "\n", (
        "regenerate: python -m megalm.train --help-config --markdown > docs/config.md")
