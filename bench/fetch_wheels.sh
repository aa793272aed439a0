#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels a GPU machine may lack, so a device call can carry that folder:
# pytest and pytest-benchmark (with their small requirements) for the test steps, diffusers for the DiT share.
# bench/gpu_suite.sh installs each wheel only where its distribution is missing (pip --no-index --no-deps), so
# carrying one the machine already has changes nothing. The other requirements of diffusers (huggingface-hub,
# safetensors, numpy, Pillow, regex, requests, filelock) are part of a PyTorch GPU image.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "pytest==${PYTEST_VERSION:-9.0.3}" pluggy==1.6.0 iniconfig==2.3.0 packaging==26.2 pygments==2.20.0 \
    "pytest-benchmark==${PYTEST_BENCHMARK_VERSION:-5.2.3}" py-cpuinfo==9.0.0 \
    "diffusers==${DIFFUSERS_VERSION:-0.42.1}"
ls -1 .whl
