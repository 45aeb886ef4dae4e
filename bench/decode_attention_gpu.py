"""GPU benchmark: the paged decode attention kernel alone, against the KV-read floor of the same run.

One layer's decode attention for `--batch` sequences of `--context` cached tokens (block size
16, blocks of a sequence contiguous as a prefill allocates them, or shuffled with
`--shuffle`), for each launch variant of the kernel (tile width, warps, program order,
splits). Each variant is timed as 20 launches in one CUDA graph (as serving runs decode).
Floor: the KV bytes the step must read (batch x context x KV heads x head dim x 2 (K, V) x
2 bytes) over the copy bandwidth measured in the same run. Each variant's output is checked
against the default launch's. The kernel runs here without RoPE and alone; a variant that
wins here must also win in the engine (`bench/native_gpu.py`) before it becomes the default:
narrow tiles on two warps, 6-7% faster here at batch 64/256, made the engine's batch-256
decode 12% slower on the H200, so the engine keeps the default.

    PYTHONPATH=. python bench/decode_attention_gpu.py [--batch 256] [--context 576]
        [--shape 1b 8b] [--shuffle] [--rope] [--variants N]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from bench.fp8_gpu import graph_ms
from bench.native_gpu import measure_bandwidth
from kvflow.engines.native.attention import AttentionMetadata, Rope
from kvflow.engines.native.triton_decode import (
    DEFAULT_LAUNCH,
    DecodeLaunch,
    SplitCounters,
    decode_splits,
    paged_decode,
)

SHAPES = {"1b": (32, 8, 64), "8b": (32, 8, 128)}  # query heads, KV heads, head dim
BLOCK = 16


def decode_meta(batch: int, context: int, shuffle: bool, device: str) -> AttentionMetadata:
    blocks = -(-(context + 1) // BLOCK)
    order = torch.randperm(batch * blocks) if shuffle else torch.arange(batch * blocks)
    table = order.to(torch.int32).view(batch, blocks).to(device)
    return AttentionMetadata(
        slot_mapping=table[:, -1].long() * BLOCK + context % BLOCK,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), context + 1, dtype=torch.int32, device=device),
        block_tables=table, max_query_len=1, max_seq_len=context + 1,
        query_start_host=list(range(batch + 1)), seq_lens_host=[context + 1] * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256])
    parser.add_argument("--context", type=int, default=576)
    parser.add_argument("--shape", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--rope", action="store_true", help="with RoPE fused in, as the engine runs it")
    parser.add_argument("--variants", type=int, default=0,
                        help="only the default and this many of the sweep's variants (first ones)")
    args = parser.parse_args()
    bandwidth = measure_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    variants = [DEFAULT_LAUNCH] + [DecodeLaunch(n, w, True, waves) for n, w, waves in
                                   itertools.product((64, 32), (2, 4, 8), (2, 4, 8))]
    if args.variants:
        variants = variants[: 1 + args.variants]
    torch.manual_seed(0)
    for shape, batch in itertools.product(args.shape, args.batch):
        sweep(shape, batch, args.context, args.shuffle, bandwidth, sms, variants, args.rope)


def sweep(shape: str, batch: int, context: int, shuffle: bool, bandwidth: float, sms: int,
          variants: list[DecodeLaunch], with_rope: bool = False) -> None:
    heads, kv_heads, dim = SHAPES[shape]
    meta = decode_meta(batch, context, shuffle, "cuda")
    num_blocks = int(meta.block_tables.max()) + 1
    cache = torch.randn(2, num_blocks, BLOCK, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    counters = SplitCounters().get(batch * kv_heads, q.device)
    floor_us = batch * context * kv_heads * dim * 2 * 2 / bandwidth * 1e6

    rope = None
    if with_rope:  # the tables the engine passes (float32, [positions, D/2]); the op is fused
        angles = torch.outer(torch.arange(context + 1, device="cuda", dtype=torch.float32),
                             torch.rand(dim // 2, device="cuda"))
        rope = Rope(meta.seq_lens.long() - 1, angles.cos(), angles.sin(), lambda *a: a[1:3])

    def run(t: DecodeLaunch) -> torch.Tensor:
        splits = decode_splits(batch, kv_heads, sms, t.waves)
        return paged_decode(q, k, v, cache, meta, dim ** -0.5, None, rope, splits, counters, t)

    reference = run(DEFAULT_LAUNCH)
    print(f"\n{shape}: batch {batch}, context {context}, shuffled={shuffle}, rope={with_rope}; "
          f"KV floor {floor_us:.1f} us")
    print(f"{'block_n':>8}{'warps':>6}{'heads 1st':>10}{'splits':>7}{'us':>9}{'of floor':>9}"
          f"{'TB/s':>7}")
    for t in variants:
        try:
            err = (run(t).float() - reference.float()).abs().max().item()
            us = 1e3 * graph_ms(lambda t=t: run(t))  # 20 launches in one CUDA graph
        except Exception as exc:  # a tiling the device cannot hold (shared memory)
            print(f"{t.block_n:>8}{t.num_warps:>6}{t.heads_fastest!s:>10}  failed: "
                  f"{type(exc).__name__}")
            continue
        mark = " (default)" if t == DEFAULT_LAUNCH else ""
        bad = f"  MISMATCH {err:.3g}" if err > 2e-2 else ""
        splits = decode_splits(batch, kv_heads, sms, t.waves)
        print(f"{t.block_n:>8}{t.num_warps:>6}{t.heads_fastest!s:>10}{splits:>7}{us:>9.1f}"
              f"{floor_us / us:>9.0%}{floor_us / us * bandwidth / 1e12:>7.2f}{mark}{bad}")

if __name__ == "__main__":
    main()
