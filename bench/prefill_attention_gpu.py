"""GPU benchmark: prefill attention alone (Triton tilings, cuDNN, the engine's pick) against matmul peak.

One layer's causal prefill attention for one sequence of `--lengths` new tokens (after
`--context` cached ones), in the 1B (32/8 heads, 64 wide) and 8B (32/8, 128 wide) shapes,
block size 16. Each row prints TFLOP/s (4 * head_dim * heads * (L^2 / 2 + L * context)) and,
for the engine's pick (`TritonPagedBackend.forward`, which stores K/V, then takes cuDNN for
one long fresh prompt and the paged kernel otherwise), its share of the bf16 matmul peak
measured in the same run. cuDNN is timed at the padded length the engine would use.
Timings are medians of eager calls, so below ~1k tokens they show launch cost, not the kernel.

    PYTHONPATH=. python bench/prefill_attention_gpu.py [--lengths 2048 4096 8192] [--context 0 4096]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from bench.native_gpu import measure_peak_flops, median_ms
from kvflow.engines.native import triton_attention as ta
from kvflow.engines.native.attention import single_prefill_meta

SHAPES = {"1b": (32, 8, 64), "8b": (32, 8, 128)}  # query heads, KV heads, head dim
BLOCK = 16
TILINGS = [ta.LONG_TILING, ta.WIDE_TILING, ta.PrefillTiling(128, 64, 4, 3),
           ta.PrefillTiling(128, 128, 8, 3), ta.PrefillTiling(64, 64, 4, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--context", type=int, nargs="+", default=[0, 4096])
    parser.add_argument("--shape", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    args = parser.parse_args()
    peak = measure_peak_flops()
    print(f"device: {torch.cuda.get_device_name()}  bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    torch.manual_seed(0)
    for shape, length, context in itertools.product(args.shape, args.lengths, args.context):
        print(row(SHAPES[shape], length, context, peak, shape), flush=True)


def row(shape: tuple[int, int, int], length: int, context: int, peak: float, name: str) -> str:
    """One line: TFLOP/s of each tiling, of cuDNN (fresh prompts) and of the engine's pick."""
    heads, kv_heads, dim = shape
    flops = 4 * dim * heads * (length * length / 2 + length * context)
    meta = single_prefill_meta(length, BLOCK, "cuda", cached=context)
    cache = torch.randn(2, -(-(length + context) // BLOCK), BLOCK, kv_heads, dim,
                        device="cuda", dtype=torch.bfloat16)
    q = torch.randn(length, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(length, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    scale = dim ** -0.5
    cells = []
    for t in TILINGS:
        ms = median_ms(lambda t=t: ta.paged_prefill(q, cache, meta, scale, None, t))
        cells.append(f"{t.block_m}x{t.block_n}/{t.num_warps}w{t.num_stages}s "
                     f"{flops / ms / 1e9:4.0f}")
    if context == 0:
        dense = ta.DensePrefill(True)
        ms = median_ms(lambda: dense(q, k, k, scale))
        cells.append(f"cuDNN@{ta.dense_length(length)} {flops / ms / 1e9:4.0f}")
    backend = ta.TritonPagedBackend()
    ms = median_ms(lambda: backend.forward(q, k, k, cache, meta, scale, None))
    pick = "cuDNN" if backend.dense.applies(q, meta, None) else "paged"
    return (f"{name} L={length:5d} ctx={context:5d} TFLOP/s: {'  '.join(cells)}  | engine "
            f"({pick}) {ms:.3f} ms {flops / ms / 1e9:4.0f} TFLOP/s = "
            f"{flops / ms * 1e3 / peak:.0%} of peak")

if __name__ == "__main__":
    main()
