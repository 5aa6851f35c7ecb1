#!/usr/bin/env bash
# Fill .whl, the folder bench/gpu_run.sh installs from on a lent GPU machine without network, with the
# wheels that machine's image lacks, at our versions, for its Python (3.12 on the images seen so far):
#
#     bash bench/wheels.sh            # needs network (pip's index); DEST=.whl PYTHON_VERSION=3.12 by default
#
# Binary wheels are downloaded for PLATFORM; deepspeed ships an sdist only, so its wheel is built here
# (pure Python: DS_BUILD_OPS=0, the ops compile nowhere, see bench/README.md). .whl is git-ignored: the
# device tool's `carry: .whl .gpu_data` sends it with the checkout.
set -euo pipefail

DEST=${DEST:-.whl}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
PIP=${PIP:-python3 -m pip}
# The packages the GPU images lacked (bench/results-gpu*/gpu.log: torch, accelerate, huggingface_hub,
# tokenizers, safetensors, pyarrow and triton come with them), plus Liger-Kernel for use_liger_kernel.
PACKAGES=(transformers==5.24.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 fsspec==2026.9.0 regex==2026.11.19
          pydantic==2.14.4 pydantic_core==2.50.5 typing_extensions==4.16.0 typing-inspection==0.4.5
          annotated-types==0.8.0 hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 sentencepiece==0.2.3
          liger-kernel==0.8.5)

mkdir -p "$DEST"
$PIP download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --platform "$PLATFORM" \
    --platform manylinux2014_x86_64 --implementation cp -d "$DEST" "${PACKAGES[@]}"
DS_BUILD_OPS=0 $PIP wheel --no-deps -w "$DEST" deepspeed==0.19.8
ls -la "$DEST"
