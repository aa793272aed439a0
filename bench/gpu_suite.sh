#!/usr/bin/env bash
# The GPU suite in one command: the GPU tests, the benchmarks and the DiT share, in order of value, each
# step under a time limit cut to what is left of SUITE_SECONDS; results under $OUT as each step finishes.
#   bash bench/gpu_suite.sh quick            # tests at bf16, tsa-grid + native benchmarks, the DiT share (< 5 min)
#   bash bench/gpu_suite.sh all              # every step that fits SUITE_SECONDS (default 540)
#   bash bench/gpu_suite.sh smoke            # every step on the CPU, toy sizes (the test suite runs this)
#   bash bench/gpu_suite.sh all --dry-run    # the plan: steps, limits, what each needs
#   bash bench/gpu_suite.sh all --steps tests,dit-wan2.1-1.3b   # only these steps
# The steps, the result files and the budget rules are in bench/gpu_suite.py; docs/gpu-suite.md has the
# command for a lent GPU machine. PYTHON selects the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_suite "$@"
