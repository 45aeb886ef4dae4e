"""GPU probe for a profiler: the 8B gate/up projection's one-row GEMV, FP8 and bf16, a few launches each.

Nothing is timed here; run it under Nsight Compute to read each kernel's DRAM throughput,
issue-slot use and occupancy (how the FP8 GEMV was found latency-bound, not bandwidth- or
issue-bound):

    PYTHONPATH=. ncu --clock-control none --kernel-name regex:_gemv_kernel --launch-skip 1 \\
        --launch-count 3 --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section InstructionStats --section WarpStateStats --section MemoryWorkloadAnalysis \\
        --section Occupancy python3 bench/fp8_gemv_ncu.py [--stages 3]

The FP8 launch is the 16 x 512 tile on 4 warps (`--stages N`: pipelined through shared
memory), the bf16 one the 8 x 1024 tile; both with the add + norm prologue, as a decode step
runs them.
"""

from __future__ import annotations

import argparse

import torch

from kvflow.engines.native import triton_gemv as tg
from kvflow.engines.native.fp8 import FP8, FP8_MAX


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=0)
    args = parser.parse_args()
    n, k = 28672, 4096
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    scale = (w.abs().amax(1) / FP8_MAX).clamp(min=1e-12)
    w8 = (w / scale[:, None]).to(FP8)
    x, residual = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kw = {"prologue": tg.ADD_NORM, "residual": residual, "eps": 1e-6, "pdl": False,
          "norm_weight": torch.ones(k, device="cuda", dtype=torch.bfloat16)}
    for _ in range(2):
        tg.gemv(x, w8, scale=scale, config=tg.GemvConfig(16, 512, 4, stages=args.stages), **kw)
    wb = w.to(torch.bfloat16)
    for _ in range(2):
        tg.gemv(x, wb, config=tg.GemvConfig(8, 1024, 4), **kw)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
