"""GPU benchmark: the paged decode attention kernel alone, against the KV-read floor of the same run.

One layer's decode attention for `--batch` sequences of `--context` cached tokens (block size
16, blocks of a sequence contiguous as a prefill allocates them, or shuffled with
`--shuffle`), for each launch variant of the kernel (tile width x warps), with RoPE fused in
as the engine runs it (`--no-rope`: without). Each variant is timed as 20 launches in one
CUDA graph (as serving runs decode). Floor: the KV bytes the step must read (batch x context
x KV heads x head dim x 2 (K, V) x 2 bytes) over the copy bandwidth measured in the same run.
Each variant's output is checked against the default launch's. A variant that wins here must
also win in the engine (`bench/native_gpu.py`) before it becomes the default: narrow tiles on
two warps (with the KV heads of a sequence launched side by side), 6-7% faster here at batch
64/256 without RoPE, made the engine's batch-256 decode 12% slower on the H200 for the 1.1B
shape (64-wide heads), but 3-14% faster for the 8B shape (128-wide), so the engine takes them
for large batches of 128-wide heads only (`triton_decode.decode_launch`).

    PYTHONPATH=. python bench/decode_attention_gpu.py [--batch 256] [--context 576]
        [--shape 1b 8b] [--shuffle] [--no-rope]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch

from bench.fp8_gpu import graph_ms
from bench.native_gpu import measure_bandwidth
from kvflow.engines.native.attention import Rope, uniform_decode_meta
from kvflow.engines.native.triton_decode import (
    DEFAULT_LAUNCH,
    DecodeLaunch,
    SplitCounters,
    decode_splits,
    paged_decode,
)

SHAPES = {"1b": (32, 8, 64), "8b": (32, 8, 128)}  # query heads, KV heads, head dim
BLOCK = 16
VARIANTS = [DecodeLaunch(n, w) for n, w in itertools.product((32, 64, 128), (2, 4, 8))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256])
    parser.add_argument("--context", type=int, default=576)
    parser.add_argument("--shape", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--no-rope", action="store_true", help="the kernel without RoPE")
    args = parser.parse_args()
    bandwidth = measure_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    torch.manual_seed(0)
    for shape, batch in itertools.product(args.shape, args.batch):
        sweep(shape, batch, args.context, args.shuffle, not args.no_rope, bandwidth, sms)


def sweep(shape: str, batch: int, context: int, shuffle: bool, with_rope: bool,
          bandwidth: float, sms: int) -> None:
    heads, kv_heads, dim = SHAPES[shape]
    meta = uniform_decode_meta(batch, context, BLOCK, "cuda")
    if shuffle:  # the same blocks, each sequence's scattered over the cache
        order = torch.randperm(meta.block_tables.numel(), device="cuda")
        table = meta.block_tables.flatten()[order].view_as(meta.block_tables)
        meta = dataclasses.replace(meta, block_tables=table,
                                   slot_mapping=table[:, -1].long() * BLOCK + context % BLOCK)
    num_blocks = meta.block_tables.numel()
    cache = torch.randn(2, num_blocks, BLOCK, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    counters = SplitCounters().get(batch * kv_heads, q.device)
    splits = decode_splits(batch, kv_heads, sms)
    floor_us = batch * context * kv_heads * dim * 2 * 2 / bandwidth * 1e6
    rope = None
    if with_rope:  # float32 tables [positions, D/2], as the engine passes them (fused here)
        angles = torch.outer(torch.arange(context + 1, device="cuda", dtype=torch.float32),
                             torch.rand(dim // 2, device="cuda"))
        rope = Rope(meta.seq_lens.long() - 1, angles.cos(), angles.sin(), lambda *a: a[1:3])

    def run(t: DecodeLaunch) -> torch.Tensor:
        return paged_decode(q, k, v, cache, meta, dim ** -0.5, None, rope, splits, counters, t)

    reference = run(DEFAULT_LAUNCH)
    print(f"\n{shape}: batch {batch}, context {context}, {splits} split(s), shuffled={shuffle}, "
          f"rope={with_rope}; KV floor {floor_us:.1f} us")
    print(f"{'block_n':>8}{'warps':>6}{'us':>9}{'of floor':>9}{'TB/s':>7}")
    for t in VARIANTS:
        try:
            err = (run(t).float() - reference.float()).abs().max().item()
            us = 1e3 * graph_ms(lambda t=t: run(t))  # 20 launches in one CUDA graph
        except Exception as exc:  # a tiling the device cannot hold (shared memory)
            print(f"{t.block_n:>8}{t.num_warps:>6}  failed: {type(exc).__name__}")
            continue
        mark = " (default)" if t == DEFAULT_LAUNCH else ""
        bad = f"  MISMATCH {err:.3g}" if err > 2e-2 else ""
        print(f"{t.block_n:>8}{t.num_warps:>6}{us:>9.1f}{floor_us / us:>9.0%}"
              f"{floor_us / us * bandwidth / 1e12:>7.2f}{mark}{bad}")


if __name__ == "__main__":
    main()
