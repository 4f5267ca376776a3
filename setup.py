"""megalm: pretrain GPT/Llama-style language models across GPU clusters."""

from pathlib import Path

from setuptools import find_packages, setup

# Each tool is a module megalm/cli/<name>.py with a main(); its console script megalm-<name> runs it
# through megalm/cli/entry.py, which lists the same directory (the only list of tools).
TOOLS = sorted(p.stem for p in (Path(__file__).parent / "megalm" / "cli").glob("*.py")
               if p.stem not in ("__init__", "entry"))

setup(
    name="megalm",
    version="0.1.0",
    description="Pretrain GPT/Llama-style models: Megatron-style tensor parallelism on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megalm", "megalm.*"]),
    package_data={"megalm": ["configs/*.yaml"]},  # the presets: `--config tiny`, the quickstart
    # Floors are what the code needs and what CI tests; megalm.seams holds every touch below the
    # public APIs of DeepSpeed and transformers, with a test each (tests/test_seams.py), so their
    # ranges are the versions those tests pass on. torch: a range, so GPU users keep their CUDA build
    # (2.6 brings torch.nn.utils.get_total_norm; CI runs 2.13).
    install_requires=[
        "torch>=2.6",
        "deepspeed>=0.19.8,<0.20",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "datasets>=2.19",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.7",  # the quickstart's loss curve
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "hf": ["transformers>=5.24,<6"],
        "wandb": ["wandb>=0.19"],
        "eval": ["lm-eval>=0.4.8"],
        "dev": [
            "pytest>=8.0",
            "ruff>=0.5",
            "transformers>=5.24,<6",
            "mpi4py>=3.1",
            "megatron-core>=0.9",
            "sacrebleu>=2.3",
            "rouge-score>=0.1.2",
            "wandb>=0.19",
            "lm-eval>=0.4.8",
            "accelerate>=0.26",  # lm-eval's Hugging Face backend, which the harness test compares with
        ],
    },
    entry_points={
        "console_scripts": [
            "megalm-train=megalm.cli.entry:train",
            *[f"megalm-{t.replace('_', '-')}=megalm.cli.entry:{t}" for t in TOOLS],
        ]
    },
)
