"""One tempered-KL forward of a preset under a profiler: `ncu --profile-from-start off python -m bench.profile_forward`.

Tunes and warms the kernels first (outside the profiled range), then runs one forward between
cudaProfilerStart / cudaProfilerStop, so Nsight Compute sees only the forward kernel.
    python -m bench.profile_forward --preset cogvideox-native [--mask-ratio 0.2] [--cs 64 --ct 64]
"""

from __future__ import annotations

import argparse

import torch

import stss_kernels

from .measure import make_inputs
from .workloads import PRESETS, build_workloads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_forward", description=__doc__)
    parser.add_argument("--preset", choices=sorted(set(PRESETS) - {"sweep"}), default="tsa-grid")
    parser.add_argument("--mask-ratio", type=float, default=1.0)
    parser.add_argument("--cs", type=int)
    parser.add_argument("--ct", type=int)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("profiling the Triton forward needs a CUDA device")
    (workload,) = build_workloads(args.preset, cs=args.cs, ct=args.ct)
    student, teacher, mask = make_inputs(
        workload, torch.bfloat16, torch.device("cuda"), mask_ratio=args.mask_ratio, seed=0
    )

    def forward():
        with torch.no_grad():
            return stss_kernels.tempered_kl(student, teacher, frames=workload.frames, query_mask=mask, backend="triton")

    forward()  # tunes (outside the profiled range) and compiles
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    forward()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled: {workload}, configs {stss_kernels.tuned_configs()}")


if __name__ == "__main__":
    main()
