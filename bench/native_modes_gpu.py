"""GPU check of the native engine's modes: batch invariance, startup warm-up (TTFT), FP8 checkpoints.

Same ~1.1B Llama as bench/native_gpu.py (random bf16 weights), in one run:

- copy bandwidth, and the decode floor (weights + KV bytes per step over it);
- warm-up: the startup log line, then TTFT of ten fresh 512-token prompts in turn (first vs tenth);
- decode tokens/s at each --batches, default engine vs --batch-invariant (the mode's cost);
- invariance: --prompts prompts of mixed lengths, greedy, alone vs together vs chunked prefill
  (step budget 128): identical token lists expected with --batch-invariant; the default engine's
  mismatch count alongside, to show what the mode fixes;
- FP8: the model quantised to compressed-tensors (per-channel) and fbgemm_fp8 checkpoints,
  served (dequantised on load) and compared token for token with their bf16 references.

    PYTHONPATH=. python bench/native_modes_gpu.py [--batches 1 64] [--prompts 64]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.native_gpu import build_model, decode_floor, engine_decode, measure_bandwidth, prompts
from kvflow.engines.native.config import NativeEngineConfig
from kvflow.engines.native.engine import NativeEngine
from kvflow.llm.protocol import PreprocessedRequest, SamplingOptions, StopConditions
from kvflow.runtime.context import Context


async def start(path: Path, **overrides: object) -> NativeEngine:
    config = {"model_path": str(path), "device": "cuda", "dtype": "bfloat16", "max_num_seqs": 64,
              "max_num_batched_tokens": 8192, "max_model_len": 2048,
              "num_gpu_blocks": 8192, **overrides}
    engine = NativeEngine(NativeEngineConfig(**config))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    await engine.start()
    print(f"engine {overrides or 'default'}: start {time.perf_counter() - t0:.1f}s", flush=True)
    return engine


async def stop(engine: NativeEngine) -> None:
    """Stop and drop the model's tensors (callers drop their reference too)."""
    await engine.stop()
    engine.runner = None
    gc.collect()
    torch.cuda.empty_cache()


async def generate(engine: NativeEngine, rid: str, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens and the time to the first one."""
    req = PreprocessedRequest(request_id=rid, token_ids=prompt,
                              sampling=SamplingOptions(temperature=0.0),
                              stop=StopConditions(max_tokens=n, ignore_eos=True))
    t0, ttft, out = time.perf_counter(), 0.0, []
    async for o in engine.generate(req, Context()):
        if not out:
            ttft = time.perf_counter() - t0
        out += o.token_ids
    return out, ttft


async def ttfts(engine: NativeEngine) -> list[float]:
    return [(await generate(engine, f"t{i}", p, 1))[1] for i, p in enumerate(prompts(10, 512, 900))]


def mixed_prompts(n: int) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 32000) for _ in range(rng.randrange(8, 400))] for _ in range(n)]


async def invariance(path: Path, invariant: bool, n: int, tag: str) -> tuple[int, int]:
    """(requests whose tokens differ together vs alone, differ chunked vs alone)."""
    ps = mixed_prompts(n)
    results = []
    for budget, together in ((8192, False), (8192, True), (128, True)):
        engine = await start(path, batch_invariant=invariant, max_num_batched_tokens=budget)
        t0 = time.perf_counter()
        if together:
            outs = await asyncio.gather(*(generate(engine, f"{tag}{i}", p, 24) for i, p in enumerate(ps)))
        else:
            outs = [await generate(engine, f"{tag}{i}", p, 24) for i, p in enumerate(ps)]
        print(f"  {tag} budget={budget} together={together}: {time.perf_counter() - t0:.1f}s", flush=True)
        results.append([o[0] for o in outs])
        await stop(engine)
    alone, together_, chunked = results
    diff = (sum(a != b for a, b in zip(alone, together_, strict=True)),
            sum(a != b for a, b in zip(alone, chunked, strict=True)))
    print(f"invariance {tag}: {n} prompts; differ together-vs-alone {diff[0]}, "
          f"chunked-vs-alone {diff[1]}", flush=True)
    return diff


async def fp8_check(path: Path, workdir: Path) -> None:
    from kvflow.testing.fp8 import make_fp8_checkpoint

    ps = mixed_prompts(8)
    for method in ("compressed-tensors", "fbgemm_fp8"):
        fp8, ref = workdir / f"fp8-{method}", workdir / f"ref-{method}"
        make_fp8_checkpoint(path, fp8, method, "channel", reference=ref)
        outs = []
        for d in (fp8, ref):
            engine = await start(d)
            outs.append([(await generate(engine, f"f{i}", p, 16))[0] for i, p in enumerate(ps)])
            await stop(engine)
        same = sum(a == b for a, b in zip(*outs, strict=True))
        print(f"fp8 {method}: {same}/{len(ps)} prompts give the same 16 greedy tokens as the "
              "dequantised bf16 reference", flush=True)


async def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kvflow.engines.native.runner").setLevel(logging.INFO)
    bandwidth = measure_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="kvflow-modes-"))
    hf = build_model(workdir / "model")
    path = workdir / "model"
    floors = {b: decode_floor(hf, b, args.isl, args.osl, bandwidth) for b in args.batches}
    del hf
    torch.cuda.empty_cache()
    rows = []
    for invariant in (False, True):
        engine = await start(path, batch_invariant=invariant)
        if not invariant:
            t = await ttfts(engine)
            print("TTFT ms of 10 fresh 512-token prompts: " + " ".join(f"{x * 1e3:.1f}" for x in t)
                  + f"; first/tenth = {t[0] / t[-1]:.2f}", flush=True)
        for b in args.batches:
            tps = await engine_decode(engine, b, args.isl, args.osl, seed=b)
            rows.append((invariant, b, tps, floors[b]))
            print(f"decode invariant={invariant} b={b}: {tps:.0f} tok/s, floor {floors[b]:.0f} "
                  f"({tps / floors[b]:.0%})", flush=True)
        await stop(engine)
    for invariant in (True, False):
        await invariance(path, invariant, args.prompts, "inv" if invariant else "default")
    if not args.skip_fp8:
        await fp8_check(path, workdir)
    print(f"\n{'mode':<12}{'batch':>6}{'tok/s':>10}{'floor':>10}{'of floor':>10}")
    for invariant, b, tps, floor in rows:
        print(f"{'invariant' if invariant else 'default':<12}{b:>6}{tps:>10.0f}{floor:>10.0f}"
              f"{tps / floor:>10.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--isl", type=int, default=512)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--skip-fp8", action="store_true")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
