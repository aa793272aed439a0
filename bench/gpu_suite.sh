#!/usr/bin/env bash
# Everything to run on a lent GPU, in one command: the test suite (GPU tests, bf16 included) and the
# benchmark presets whose figures README.md reports. Results land in bench/results/ (and in $OUT when
# set, e.g. by the device tool, so they come back); commit bench/results/ afterwards.
#   bash bench/gpu_suite.sh            # all presets
#   bash bench/gpu_suite.sh quick      # tests + tsa-grid (masked and unmasked) + cogvideox-native only
set -uo pipefail
cd "$(dirname "$0")/.."
results=bench/results
mkdir -p "$results"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$results/gpu-environment.txt"

python -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_tempered_kl.py tests/test_torch_backend.py \
    tests/test_relation_distance.py tests/test_relation_distance_backends.py 2>&1 \
    | tee "$results/gpu-tests.log" | tail -n 15

presets=("--preset tsa-grid" "--preset tsa-grid --mask-ratio 0.2" "--preset cogvideox-native"
         "--op relation_distance --preset tsa-grid" "--op relation_distance --preset cogvideox-native")
if [ "${1:-all}" != quick ]; then
    presets+=("--preset cogvideox-native --mask-ratio 0.2" "--preset cogvideox15 --providers reference,torch,triton"
              "--preset sweep --providers reference,compiled,triton")
fi
for preset in "${presets[@]}"; do
    echo "== python -m bench $preset"
    # shellcheck disable=SC2086
    python -m bench $preset --out "$results" 2>&1 | grep -v "^bench:" | tee -a "$results/gpu-bench.log"
done

if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu-results.tgz" "$results"
fi
