"""Session fixtures: byte shards of Python's bundled docs and three tiny trained checkpoints.

    llama_tp2_pp2   TP2 PP2 ZeRO-1 fp32, untied llama with GQA (4 ranks)
    llama_tp2_z3    TP2 DP2 ZeRO-3 bf16, tied llama (4 ranks)
    gpt2_pp2        PP2 ZeRO-1 fp32, tied gpt2 (2 ranks)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
COMMON = ["train.steps=3", "train.global_batch_size=8", "checkpoint.interval=0", "logging.tensorboard=false",
          "logging.console=false", "train.eval_interval=0", "data.num_workers=0"]
LAYOUTS = {
    "llama_tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2", "zero.stage=1", "train.precision=fp32"]),
    "llama_tp2_z3": (4, ["parallel.tensor=2", "zero.stage=3", "train.precision=bf16", "model.tie_embeddings=true"]),
    "gpt2_pp2": (2, ["parallel.pipeline=2", "zero.stage=1", "train.precision=fp32", "model.arch=gpt2",
                     "model.num_kv_heads=4", "model.ffn_hidden_size=256", "model.tie_embeddings=true"]),
}


def train_run(run_dir: Path, world: int, overrides: list[str], config: str = TINY) -> list[float]:
    """Train `config` (default configs/tiny.yaml) on `world` gloo ranks; return rank 0's per-step losses."""
    from megalm.testing.distributed import run_distributed_test
    from megalm.testing.parity import train_rank

    args = (config, [*COMMON, f"train.run_dir={run_dir}", *overrides])
    return run_distributed_test(train_rank, world, args=args, timeout=600, env={"DS_ACCELERATOR": "cpu"})[0]


@pytest.fixture(scope="session")
def convert_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    import pydoc_data.topics

    from megalm.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("convert-shards")
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as f:
        for _, text in sorted(pydoc_data.topics.topics.items()):
            for para in text.split("\n\n"):
                if len(para.strip()) > 40:
                    f.write(json.dumps({"text": para.strip()}) + "\n")
    preprocess([str(d / "corpus.jsonl")], "text", "byte", "", str(d / "docs"), workers=1, progress=False)
    return str(d / "docs")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, convert_shards: str) -> dict[str, Path]:
    """name -> RUN_DIR of each layout in LAYOUTS, trained 3 steps."""
    root = tmp_path_factory.mktemp("convert-runs")
    out = {}
    for name, (world, overrides) in LAYOUTS.items():
        train_run(root / name, world, [f"data.train_prefixes=[{convert_shards}]", *overrides])
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def trainer():
    """train_run, for tests (conftest is not importable under --import-mode=importlib)."""
    return train_run
