#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored) so a device call can carry them:
# diffusers (for `python -m bench --dit`) and importlib_metadata (its one requirement missing there).
# The device's image has torch 2.11, Triton 3.6, huggingface-hub, safetensors, numpy, Pillow, regex, requests.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==${DIFFUSERS_VERSION:-0.42.1}" importlib_metadata
ls -1 .whl
