#!/usr/bin/env bash
# Everything to run on a lent GPU in one command (about 8 minutes on an H100): the GPU tests (bf16 included),
# every benchmark preset for every op with both kernel generations, the DiT-step share, an ncu profile of the
# forward, and the tuned configs. Results land in bench/results/gpu-suite-DATE/ (and as a tarball in $OUT
# when set, e.g. by the device tool, so they come back); commit that folder afterwards.
#   bash bench/gpu_suite.sh            # everything
#   bash bench/gpu_suite.sh quick      # tests + tsa-grid + cogvideox-native (C = 768) + the DiT share only
#   DRY_RUN=1 bash bench/gpu_suite.sh  # print the steps without running them
# Each step has its own time limit, cut to what is left of SUITE_SECONDS (default 470) for the whole suite; a
# failing or timed-out step is logged and the suite goes on; steps come in order of value (tests, presets, DiT
# share, narrow features, masks, profile).
# diffusers (for the DiT step) is installed from wheels in .whl/ when the machine lacks it: fetch them first
# with `bash bench/fetch_wheels.sh` here, and carry .whl with the call.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
stamp=$(date -u +%Y%m%d-%H%M%S)
results=bench/results/gpu-suite-$stamp
[ -n "${DRY_RUN:-}" ] && results=${TMPDIR:-/tmp}/gpu-suite-dry-run-$stamp
mkdir -p "$results"
summary=$results/summary.txt
: >"$summary"
export PYTHONUNBUFFERED=1 STSS_PRINT_AUTOTUNING=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/stss-triton-cache}  # shared by every step: compile once

deadline=$((SECONDS + ${SUITE_SECONDS:-470}))

# step NAME SECONDS COMMAND...: run with a time limit, log to $results/NAME.log, record the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    local remaining=$((deadline - SECONDS))
    if [ "$remaining" -lt 20 ]; then
        echo "$name: skipped (suite time budget spent)" | tee -a "$summary"
        return 0
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    echo "== $name (limit ${limit}s): $*"
    if [ -n "${DRY_RUN:-}" ]; then
        echo "$name: dry run" >>"$summary"
        return 0
    fi
    local start=$SECONDS status
    timeout --kill-after=10 "$limit" "$@" >"$results/$name.log" 2>&1
    status=$?
    tail -n 25 "$results/$name.log"
    local outcome=ok
    if [ $status -eq 124 ] || [ $status -eq 137 ]; then outcome="TIMED OUT"; elif [ $status -ne 0 ]; then outcome="FAILED ($status)"; fi
    echo "$name: $outcome in $((SECONDS - start))s" | tee -a "$summary"
}

# Python packages the machine lacks (diffusers), from carried wheels.
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/stss-site .whl/*.whl \
        && export PYTHONPATH=/tmp/stss-site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -n 1
    git describe --always --dirty 2>/dev/null || true
    command -v ncu >/dev/null && ncu --version | tail -n 1 || echo "ncu: not found"
} 2>&1 | tee "$results/environment.txt"

has_op() { python3 -c "import importlib, sys; importlib.import_module('stss_kernels.ops.$1')" 2>/dev/null; }

# GPU tests, both kernel generations, bf16 included; the default config only (no tuning: exactness, not speed).
tests=(tests/test_triton_backend.py tests/test_tempered_kl.py tests/test_torch_backend.py tests/test_tuning.py)
has_op relation_distance && for file in tests/test_relation_distance*.py; do [ -e "$file" ] && tests+=("$file"); done
step tests 170 env STSS_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -x "${tests[@]}"

# Benchmark presets: reference beside both kernel generations; configs tuned per shape class on first use.
bench=(python3 -m bench --out "$results" --no-plot --providers reference,triton,triton-v2)
step tsa-grid 75 "${bench[@]}" --preset tsa-grid
step cogvideox-native 90 "${bench[@]}" --preset cogvideox-native

# The loss's share of a CogVideoX-2B training step at its native grid (17,550 tokens).
step dit-cogvideox-2b 100 python3 -m bench --dit cogvideox-2b --out "$results"

if [ "$mode" != quick ]; then
    step tsa-grid-c64 45 "${bench[@]}" --preset tsa-grid --cs 64 --ct 64 --tag tsa-grid-c64-cuda-bfloat16
    step cogvideox-native-c64 50 "${bench[@]}" --preset cogvideox-native --cs 64 --ct 64 --tag cogvideox-native-c64-cuda-bfloat16
    step tsa-grid-mask0.2 45 "${bench[@]}" --preset tsa-grid --mask-ratio 0.2
    step cogvideox-native-mask0.2 50 "${bench[@]}" --preset cogvideox-native --mask-ratio 0.2
    if has_op relation_distance && python3 -m bench --help | grep -q -- "--op"; then
        step relation-distance-tsa-grid 45 "${bench[@]}" --op relation_distance --preset tsa-grid
        step relation-distance-cogvideox-native 45 "${bench[@]}" --op relation_distance --preset cogvideox-native
    fi
fi

# ncu: L2 hit rate, DRAM bytes, tensor-pipe activity and stall reasons of the forward kernel.
if [ "$mode" != quick ] && command -v ncu >/dev/null; then
    sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats)
    metrics=lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum  # tensor pipes: ComputeWorkloadAnalysis
    for preset in tsa-grid cogvideox-native; do
        for generation in 1 2; do
            step "ncu-$preset-gen$generation" 45 ncu --profile-from-start off --kernel-name regex:tempered_kl_forward \
                "${sections[@]}" --metrics "$metrics" --csv --page details \
                python3 -m bench.profile_forward --preset "$preset" --generation "$generation"
        done
    done
elif [ "$mode" != quick ]; then
    echo "ncu: not on this machine, profile skipped" | tee -a "$summary"
fi
[ "$mode" != quick ] && step dit-wan2.1-1.3b 90 python3 -m bench --dit wan2.1-1.3b --out "$results"

echo "== summary"
cat "$summary"
if [ -n "${OUT:-}" ] && [ -z "${DRY_RUN:-}" ]; then
    tar czf "$OUT/gpu-suite-$stamp.tgz" "$results"
fi
