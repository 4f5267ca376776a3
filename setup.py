"""megalm: pretrain GPT/Llama-style language models across GPU clusters."""

from setuptools import find_packages, setup

# Each tool is megalm/cli/<name>.py with a main(); tools/<name>.py is a thin wrapper around it.
# Each tool is megalm/cli/<name>.py with a main(); tools/<name>.py and the console script
# megalm-<name> (megalm/cli/entry.py) run it. Kept equal to megalm/cli/entry.py:TOOLS (tested).
TOOLS = [
    "train_tokenizer", "preprocess_data", "merge_datasets", "bench_data", "convert_checkpoint", "generate",
    "evaluate", "plan", "benchmark", "parity",
]

setup(
    name="megalm",
    version="0.1.0",
    description="Pretrain GPT/Llama-style models: Megatron-style tensor parallelism on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megalm", "megalm.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
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
        "hf": ["transformers>=4.44"],
        "dev": [
            "pytest>=8.0",
            "ruff>=0.5",
            "transformers>=4.44",
            "mpi4py>=3.1",
            "megatron-core>=0.9",
            "sacrebleu>=2.3",
            "rouge-score>=0.1.2",
        ],
    },
    entry_points={
        "console_scripts": [
            "megalm-train=megalm.cli.entry:train",
            *[f"megalm-{t.replace('_', '-')}=megalm.cli.entry:{t}" for t in TOOLS],
        ]
    },
)
