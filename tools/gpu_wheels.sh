#!/usr/bin/env bash
# The Python packages the lent GPU machine lacks (its image has torch, transformers, sentencepiece,
# tokenizers, safetensors, tensorboard, ... but not DeepSpeed and its pydantic/hjson, and its transformers
# is older than megalm's range: the venv's transformers travels with its hub client), as wheels for
# its Python 3.12 on x86-64, in .whl/ (ignored by git). Run here, with the project's venv active;
# then each device run carries .whl and tools/gpu_checks.sh installs them first.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
# DeepSpeed is published as source only: build its pure-Python wheel (no ops compiled) here
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
    "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic_core)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
    "hjson==$(version hjson)" \
    "transformers==$(version transformers)" "huggingface-hub==$(version huggingface_hub)" \
    "kernels==$(version kernels)" "tomlkit==$(version tomlkit)" "httpx2==$(version httpx2)" \
    "httpcore2==$(version httpcore2)" "truststore==$(version truststore)"
ls -la .whl
