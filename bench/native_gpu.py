"""GPU benchmark: the native engine against transformers and against the hardware floor, in one run.

A ~1.1B-parameter Llama with random bf16 weights is built on the device, saved as safetensors
and served by NativeEngine from that directory; transformers runs the same weights.
Measured in the same process: HBM bandwidth (a large device copy) and the bf16 matmul peak,
which give each figure's floor (decode: weights + KV bytes per step over bandwidth;
prefill: flops over peak).

    PYTHONPATH=. python bench/native_gpu.py [--batches 1 16 64 256] [--out results.json]
        [--stream-interval N] [--uvloop] [--ttft] [--breakdown]

Workers serve on uvloop; `--uvloop` measures that way (plain asyncio otherwise), and
`--stream-interval N` with the engine's option of that name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvflow.engines.native.config import NativeEngineConfig
from kvflow.engines.native.engine import NativeEngine
from kvflow.llm.protocol import PreprocessedRequest, SamplingOptions, StopConditions
from kvflow.runtime.context import Context

MODEL = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 32000,
         "max_position_embeddings": 16384}


@dataclass
class Row:
    workload: str
    ours: float  # tokens/s
    transformers: float
    floor: float  # tokens/s at the hardware floor

    @property
    def of_floor(self) -> float:
        return self.ours / self.floor

    @property
    def speedup(self) -> float:
        return self.ours / self.transformers if self.transformers else float("nan")


def median_ms(fn, reps: int = 10) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus written."""
    src = torch.randn(1 << 29, device="cuda")  # 2 GiB of float32
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms / 1e3)


def measure_peak_flops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    return 2 * 8192**3 / (ms / 1e3)


def build_model(path: Path):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODEL)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return load_reference(path)


def load_reference(path: Path):  # type: ignore[no-untyped-def]
    """transformers' model in bf16, loaded with the dtype argument (not `.to(bfloat16)`), so the
    rotary inverse frequencies stay float32 as in a real deployment."""
    from transformers import LlamaForCausalLM

    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, device_map="cuda")
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32, f"rotary inv_freq is {inv_freq.dtype}"
    return model.eval()


def non_embedding_bytes(model) -> int:  # type: ignore[no-untyped-def]
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if "embed_tokens" not in n)


def kv_bytes_per_token() -> int:
    head_dim = MODEL["hidden_size"] // MODEL["num_attention_heads"]
    return 2 * MODEL["num_hidden_layers"] * MODEL["num_key_value_heads"] * head_dim * 2


def prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, MODEL["vocab_size"], (batch, length), generator=gen).tolist()


async def engine_decode(engine: NativeEngine, batch: int, isl: int, osl: int, seed: int) -> float:
    """Decode tokens/s while all `batch` requests are decoding (after the last first token)."""
    stamps: list[list[float]] = [[] for _ in range(batch)]

    async def one(i: int, prompt: list[int]) -> None:
        req = PreprocessedRequest(request_id=f"d{seed}-{i}", token_ids=prompt,
                                  sampling=SamplingOptions(temperature=0.0),
                                  stop=StopConditions(max_tokens=osl, ignore_eos=True))
        async for out in engine.generate(req, Context()):
            stamps[i] += [time.perf_counter()] * len(out.token_ids)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts(batch, isl, seed))))
    t0 = max(s[0] for s in stamps)
    t1 = min(s[-1] for s in stamps)
    tokens = sum(sum(1 for t in s if t0 < t <= t1) for s in stamps)
    return tokens / (t1 - t0)


async def first_requests(engine: NativeEngine, isl: int) -> list[float]:
    """Time to first token of ten fresh prompts, one after another (the first is the first
    request the engine serves). The engine thread's steps for the first one run under cProfile
    and the top of the profile is printed: where a slow first request went. (One profiler only:
    from Python 3.12 a second active one raises.)"""
    import cProfile
    import pstats

    times = []
    prof = cProfile.Profile()
    step = engine.step

    def profiled_step() -> None:
        try:
            prof.enable()
        except ValueError:  # another profiler is active: run unprofiled
            step()
            return
        try:
            step()
        finally:
            prof.disable()

    for i, prompt in enumerate(prompts(10, isl, 900)):
        req = PreprocessedRequest(request_id=f"t{i}", token_ids=prompt,
                                  sampling=SamplingOptions(temperature=0.0),
                                  stop=StopConditions(max_tokens=1, ignore_eos=True))
        if i == 0:
            engine.step = profiled_step  # type: ignore[method-assign]
        start = time.perf_counter()
        async for _ in engine.generate(req, Context()):
            break
        times.append(time.perf_counter() - start)
        if i == 0:
            engine.step = step  # type: ignore[method-assign]
    print("--- first request, engine thread (cumulative)")
    if prof.getstats():
        pstats.Stats(prof).sort_stats("cumulative").print_stats(14)
    else:  # answered without a step (an error), or a profiler was already active
        print("(no engine step was profiled)")
    return times


async def engine_prefill(engine: NativeEngine, length: int, reps: int = 3) -> float:
    """Prompt tokens/s: time to first token of a fresh (uncached) prompt, median of reps."""
    times = []
    for r in range(reps + 1):
        req = PreprocessedRequest(request_id=f"p{r}", token_ids=prompts(1, length, 1000 + r)[0],
                                  sampling=SamplingOptions(temperature=0.0),
                                  stop=StopConditions(max_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        async for _ in engine.generate(req, Context()):
            pass
        times.append(time.perf_counter() - start)
    return length / sorted(times[1:])[reps // 2]


def hf_decode(model, batch: int, isl: int, osl: int) -> float:  # type: ignore[no-untyped-def]
    """transformers generate: decode tokens/s = (full run - prefill-only run) over batch*(osl-1)."""
    ids = torch.tensor(prompts(batch, isl, 7), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(2)  # warm-up
    prefill = run(1)
    return batch * (osl - 1) / (run(osl) - prefill)


def hf_prefill(model, length: int) -> float:  # type: ignore[no-untyped-def]
    ids = torch.tensor(prompts(1, length, 3), device="cuda")
    with torch.no_grad():
        ms = median_ms(lambda: model(ids, logits_to_keep=1), reps=3)
    return length / (ms / 1e3)


def decode_floor(model, batch: int, isl: int, osl: int, bandwidth: float) -> float:  # type: ignore[no-untyped-def]
    kv = batch * (isl + osl / 2) * kv_bytes_per_token()  # mean context over the run
    return batch / ((non_embedding_bytes(model) + kv) / bandwidth)


def prefill_floor(model, length: int, peak: float) -> float:  # type: ignore[no-untyped-def]
    params = non_embedding_bytes(model) // 2
    attention = 2 * length * length * MODEL["hidden_size"] * MODEL["num_hidden_layers"]  # causal
    flops = 2 * params * length + attention
    return length / (flops / peak)


def decode_breakdown(runner, batch: int, isl: int, osl: int, sync: bool) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """ms per decode step in each phase, on the scheduler directly (no threads, no asyncio)."""
    from kvflow.engines.core import BlockPool, Scheduler, SchedulerConfig, Sequence, StopRule
    from kvflow.engines.native.sampler import RequestSampling

    pool = BlockPool(runner.num_blocks, runner.block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=max(batch, 1), max_num_batched_tokens=8192,
                                      block_size=runner.block_size,
                                      max_model_len=runner.max_model_len), pool)
    greedy = RequestSampling(temperature=0.0)  # as the decode runs above (graph argmax)
    sampling = {f"x{i}": greedy for i in range(batch)}
    for i, p in enumerate(prompts(batch, isl, 50 + batch)):
        sched.add(Sequence(f"x{i}", p, StopRule(max_tokens=osl, ignore_eos=True)))
    phases = dict.fromkeys(("schedule", "prepare", "launch", "collect", "update"), 0.0)
    steps = 0
    while sched.has_work():
        t = [time.perf_counter()]
        out = sched.schedule()
        t.append(time.perf_counter())
        inputs = runner.prepare(out.scheduled)
        t.append(time.perf_counter())
        launched = runner.launch(inputs, sampling, greedy_plain=True)
        if sync:
            torch.cuda.synchronize()
        t.append(time.perf_counter())
        result = runner.collect(launched)
        t.append(time.perf_counter())
        sched.update(result.sampled)
        t.append(time.perf_counter())
        if all(not s.is_prefill for s in out.scheduled) and len(out.scheduled) == batch:
            steps += 1
            for k, name in enumerate(phases):
                phases[name] += t[k + 1] - t[k]
    return {k: 1e3 * v / steps for k, v in phases.items()} | {"steps": steps}


def graph_replay_ms(runner, batch: int) -> float:  # type: ignore[no-untyped-def]
    graphs = runner.graphs
    size = min(s for s in graphs.sizes if s >= batch)
    return median_ms(graphs.graphs[size].replay, reps=20)


def prefill_breakdown(runner, length: int) -> None:  # type: ignore[no-untyped-def]
    from kvflow.engines.native import triton_attention as ta
    from kvflow.engines.native.attention import single_prefill_meta

    meta = single_prefill_meta(length, runner.block_size, runner.device)
    ids = torch.randint(3, 30000, (length,), device="cuda")
    pos = torch.arange(length, device="cuda")
    with torch.inference_mode():
        fwd = median_ms(lambda: runner.model(ids, pos, meta), reps=5)
        q = torch.randn(length, 32, 64, device="cuda", dtype=torch.bfloat16)
        cache = runner.kv_caches[0]
        print(f"prefill {length}: model forward {fwd:.2f} ms", flush=True)
        for t in (ta.PrefillTiling(128, 64, 8, 2), ta.PrefillTiling(128, 64, 4, 3),
                  ta.PrefillTiling(128, 128, 8, 2), ta.PrefillTiling(64, 64, 4, 3),
                  ta.PrefillTiling(128, 64, 8, 3), ta.PrefillTiling(128, 32, 4, 3)):
            ms = median_ms(lambda t=t: ta.paged_prefill(q, cache, meta, 0.125, None, t), reps=5)
            print(f"  attention {t}: {ms:.3f} ms x16 layers = {16 * ms:.1f} ms", flush=True)
        qh = q.transpose(0, 1)[None]
        kh = torch.randn(1, 8, length, 64, device="cuda", dtype=torch.bfloat16)
        sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            qh, kh, kh, is_causal=True, enable_gqa=True), reps=5)
        print(f"  torch sdpa causal (contiguous): {sdpa:.3f} ms", flush=True)


def kernel_profile(fn, label: str) -> None:  # type: ignore[no-untyped-def]
    """Top CUDA kernels of five calls of `fn` (after three warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
    print(f"--- {label} (5 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)


def profiles(runner, prefill_len: int, batches: list[int]) -> None:  # type: ignore[no-untyped-def]
    from kvflow.engines.native.attention import single_prefill_meta, uniform_decode_meta

    model = runner.model
    for b in batches:  # eager, so each kernel shows (the graph replays the same kernels)
        meta = uniform_decode_meta(b, 576, runner.block_size, runner.device)
        ids = torch.full((b,), 5, device="cuda")
        pos = torch.full((b,), 576, device="cuda")
        kernel_profile(lambda meta=meta, ids=ids, pos=pos: model.compute_logits(
            model(ids, pos, meta)), f"eager decode b={b}")
    meta = single_prefill_meta(prefill_len, runner.block_size, runner.device)
    ids = torch.randint(3, 30000, (prefill_len,), device="cuda")
    pos = torch.arange(prefill_len, device="cuda")
    kernel_profile(lambda: model(ids, pos, meta), f"prefill {prefill_len}")


def breakdown(engine: NativeEngine, args: argparse.Namespace) -> None:
    """Per-phase host timings (synchronous loop), graph replay time, kernel profiles."""
    runner = engine.runner
    for batch in args.batches:  # before the profiler: it leaves every later launch slower
        print(f"b={batch}: graph replay {graph_replay_ms(runner, batch):.3f} ms", flush=True)
        for sync in (False, True):
            phases = decode_breakdown(runner, batch, args.isl, min(args.osl, 64), sync)
            text = " ".join(f"{k}={v:.3f}" for k, v in phases.items())
            print(f"  sync={sync}: {text}", flush=True)
    profiles(runner, args.prefill_len, args.batches)
    if args.prefill_tilings:
        prefill_breakdown(runner, args.prefill_len)


async def run(args: argparse.Namespace) -> list[Row]:
    bandwidth, peak = measure_bandwidth(), measure_peak_flops()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e12:.2f} TB/s  "
          f"bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="kvflow-bench-"))
    hf = build_model(workdir)
    config = NativeEngineConfig(model_path=str(workdir), device="cuda", dtype="bfloat16",
                                max_num_seqs=max(args.batches), max_num_batched_tokens=8192,
                                max_model_len=args.prefill_len + 16,
                                gpu_memory_utilization=0.6, stream_interval=args.stream_interval)
    engine = NativeEngine(config)
    start = time.perf_counter()
    await engine.start()
    print(f"engine start {time.perf_counter() - start:.1f}s, "
          f"{engine.runner.num_blocks} blocks", flush=True)  # type: ignore[union-attr]
    if args.ttft:
        ttfts = await first_requests(engine, args.isl)
        print("TTFT ms of the first 10 requests after startup (fresh prompts of "
              f"{args.isl} tokens, one at a time): " + " ".join(f"{t * 1e3:.1f}" for t in ttfts)
              + f"; first/tenth = {ttfts[0] / ttfts[-1]:.2f}", flush=True)
    rows: list[Row] = []
    for batch in args.batches:
        ours = await engine_decode(engine, batch, args.isl, args.osl, seed=batch)
        theirs = hf_decode(hf, batch, args.isl, args.osl) if not args.skip_hf else 0.0
        rows.append(Row(f"decode b={batch}", ours, theirs,
                        decode_floor(hf, batch, args.isl, args.osl, bandwidth)))
        print(rows[-1], flush=True)
    ours = await engine_prefill(engine, args.prefill_len)
    rows.append(Row(f"prefill {args.prefill_len}", ours, hf_prefill(hf, args.prefill_len),
                    prefill_floor(hf, args.prefill_len, peak)))
    compiles = engine.compile_watch.compiles
    print(f"Triton compiles after start-up (each one a request waited for): {len(compiles)}"
          + "".join(f"\n  {c}" for c in compiles), flush=True)
    await engine.stop()
    if args.breakdown:
        breakdown(engine, args)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--isl", type=int, default=512)
    parser.add_argument("--osl", type=int, default=256)
    parser.add_argument("--prefill-len", type=int, default=8192)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--breakdown", action="store_true",
                        help="then per-phase timings, graph replay times and kernel profiles")
    parser.add_argument("--prefill-tilings", action="store_true",
                        help="with --breakdown: time the prefill attention tilings too")
    parser.add_argument("--ttft", action="store_true",
                        help="first: TTFT of the first 10 requests after startup (and the "
                             "engine's start-up log, which says what it warmed)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="the engine's --stream-interval (tokens per stream output after the first)")
    parser.add_argument("--uvloop", action="store_true",
                        help="run on uvloop, as workers do (default: plain asyncio)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.ttft:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.uvloop:
        import uvloop

        rows = uvloop.run(run(args))
    else:
        rows = asyncio.run(run(args))
    print(f"\n{'workload':<16}{'ours tok/s':>12}{'hf tok/s':>12}{'x hf':>8}"
          f"{'floor tok/s':>13}{'of floor':>10}")
    for r in rows:
        print(f"{r.workload:<16}{r.ours:>12.0f}{r.transformers:>12.0f}{r.speedup:>8.1f}"
              f"{r.floor:>13.0f}{r.of_floor:>10.0%}")
    if args.out:
        args.out.write_text(json.dumps([asdict(r) | {"of_floor": r.of_floor} for r in rows]))


if __name__ == "__main__":
    main()
