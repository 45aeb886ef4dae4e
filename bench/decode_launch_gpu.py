"""GPU benchmark: the decode attention launch (keys a turn x warps) inside the engine's decode, 8B shape.

For each launch, a model runner is built with every decode step forced onto it (graphs
captured with it), and batch-256 decode is timed as `bench/fp8_gpu.py` times it (async
output, greedy, CUDA graphs; ISL 512, OSL 128), against the floor of the same run: weights +
KV bytes a step over the measured copy bandwidth. Each launch runs `--reps` times, interleaved,
since the default launch's figure moved 10% between repetitions.

    PYTHONPATH=. python bench/decode_launch_gpu.py [--batch 256] [--reps 2] [--launches 64x4 32x2 32x4]

The figures quoted at `triton_decode.LARGE_BATCH_LAUNCH` came from the probe this script
was made from, which set the module's default launch before the engine picked launches by
batch (`decode_launch`); this script forces the launch through `decode_launch` instead.
"""

from __future__ import annotations

import argparse
import gc

import torch

from bench.fp8_gpu import LLAMA_8B, decode_tps, engine_config, kv_bytes_per_token, random_model, weight_bytes
from bench.native_gpu import measure_bandwidth
from kvflow.engines.native import triton_attention
from kvflow.engines.native.config import ModelConfig
from kvflow.engines.native.runner import ModelRunner
from kvflow.engines.native.triton_decode import DecodeLaunch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--launches", nargs="+", default=["64x4", "32x2", "32x4"])
    parser.add_argument("--blocks", type=int, default=12288, help="KV blocks of 16 tokens")
    args = parser.parse_args()
    run = argparse.Namespace(batches=[args.batch], isl=512, osl=128, prefill_len=8192, blocks=args.blocks)
    bandwidth = measure_bandwidth()
    cfg = ModelConfig.from_dict(LLAMA_8B)
    model = random_model(cfg, run.prefill_len + 16)
    kv = args.batch * (run.isl + run.osl / 2) * kv_bytes_per_token(cfg)
    floor = args.batch / ((weight_bytes(model) + kv) / bandwidth)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; floor at batch {args.batch}: {floor:.0f} tok/s")
    chosen = triton_attention.decode_launch
    try:
        for rep in range(args.reps):
            for name in args.launches:
                block_n, warps = (int(x) for x in name.split("x"))
                launch = DecodeLaunch(block_n, warps)
                triton_attention.decode_launch = lambda *_, launch=launch: launch  # type: ignore[assignment]
                runner = ModelRunner(model, engine_config(run), torch.device("cuda"), torch.bfloat16,
                                     run.prefill_len + 16)
                tps = decode_tps(runner, args.batch, run.isl, run.osl)
                print(f"rep {rep} launch {name}: {tps:.0f} tok/s ({tps / floor:.1%} of the floor)",
                      flush=True)
                del runner
                model.set_kv_caches([torch.empty(0)] * cfg.num_layers)
                gc.collect()
                torch.cuda.empty_cache()
    finally:
        triton_attention.decode_launch = chosen


if __name__ == "__main__":
    main()
