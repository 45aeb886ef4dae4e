"""CPU benchmark of the native engine's host work per decode step at large batches.

At batch 256 on an H200 a decode step's graph replay takes ~1.7 ms, so the Python work around
it (schedule, staging the inputs, launch bookkeeping, collect, update, deliveries) decides the
throughput. This runs that work on the CPU with a tiny model, using the decode-graph path with
eager replay as a stand-in for the captured graph, and prints ms per step for each phase,
with the model's own time shown apart so what is left is the host's part.

    PYTHONPATH=. python bench/native_host.py [--batch 256] [--profile] [--engine 3]

`--engine N` also drives the whole NativeEngine (engine thread + asyncio streams, async output)
and prints decode steps/s and the host ms per step left after the model's time;
`--stream-interval K` runs it with that many tokens per stream output, `--uvloop` on uvloop
(as workers run) instead of asyncio's own loop; `--device-ms MS` simulates a device that takes
MS per step (launch to tokens on the host, the GIL free meanwhile), so the wall time per step
over MS is the host work that would not hide behind the device. `--reps N`: each phase's best
of N passes (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import pstats
import tempfile
import time
from pathlib import Path

import torch

from kvflow.engines.core import BlockPool, Scheduler, SchedulerConfig, Sequence, StopRule
from kvflow.engines.native.config import NativeEngineConfig
from kvflow.engines.native.cuda_graphs import DecodeGraphs
from kvflow.engines.native.runner import ModelRunner, cdiv
from kvflow.engines.native.sampler import RequestSampling
from kvflow.testing.models import make_tiny_model

PHASES = ("schedule", "prepare", "launch", "collect", "update")
# CPU time, not wall time: the figures stay comparable on a loaded machine.
clock = time.thread_time


class StubGraphs(DecodeGraphs):
    """The decode-graph path on the CPU (same staging, chaining and argmax output) with a
    stand-in for the model: each row's logits peak at (token + position) % vocab. What is
    timed around it is then the host's work alone."""

    def _forward(self, size: int) -> torch.Tensor:
        longs = self.inputs.longs
        self.model.ops.chain_ids(longs[0, :size], longs[3, :size], self.sampled)
        vocab = self.model.cfg.vocab_size
        logits = torch.zeros(size, vocab)
        logits[torch.arange(size), (longs[0, :size] + longs[1, :size]) % vocab] = 1.0
        torch.argmax(logits, dim=-1, out=self.sampled[:size])
        return logits


@dataclasses.dataclass
class _TimedTokens:
    """Sampled ids that a simulated device hands over at `done` (perf_counter seconds)."""

    host: torch.Tensor
    done: float

    def wait(self) -> list[int]:
        left = self.done - time.perf_counter()
        if left > 0:
            time.sleep(left)  # the GIL is free meanwhile, as while a real step runs
        return self.host.tolist()


class SimulatedDevice:
    """Stands in for the runner's token readback: each step occupies a device for `step_ms`,
    from its launch or the end of the step before, whichever is later, and its tokens reach
    the host when it ends. The engine's wall time per step then shows how much of the host's
    work does not hide behind a device step of that length."""

    def __init__(self, step_ms: float) -> None:
        self.step_s = step_ms / 1e3
        self.free_at = 0.0

    def fetch(self, ids: torch.Tensor) -> _TimedTokens:
        self.free_at = max(time.perf_counter(), self.free_at) + self.step_s
        return _TimedTokens(ids.clone(), self.free_at)


def eager_graphs(runner: ModelRunner) -> DecodeGraphs:
    sizes = tuple(s for s in runner.engine.cuda_graph_batch_sizes if s <= runner.engine.max_num_seqs)
    return StubGraphs(runner.model, runner.layout, cdiv(runner.max_model_len, runner.block_size),
                      sizes, runner.device, runner.sampled)


def config(model: Path, batch: int, max_len: int) -> NativeEngineConfig:
    return NativeEngineConfig(model_path=str(model), device="cpu", dtype="float32",
                              max_num_seqs=batch, max_num_batched_tokens=max(8192, batch),
                              max_model_len=max_len, cpu_kv_cache_gb=0.5, async_output=True)


def prompts(batch: int, isl: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(3, vocab, (batch, isl), generator=gen).tolist()


def model_ms(runner: ModelRunner, batch: int, reps: int = 20) -> float:
    """The stand-in forward alone, at this batch (the part a graph replays)."""
    graphs = runner.graphs
    assert graphs is not None
    size = min(s for s in graphs.sizes if s >= batch)
    with torch.inference_mode():
        graphs._forward(size)
        start = clock()
        for _ in range(reps):
            graphs._forward(size)
    return 1e3 * (clock() - start) / reps


def phases(runner: ModelRunner, batch: int, isl: int, osl: int,
           profiler: cProfile.Profile | None) -> dict[str, float]:
    """ms per full-batch decode step in each phase, pipelined as the engine runs it (async
    output: step k+1 is scheduled and launched before step k is collected and updated)."""
    pool = BlockPool(runner.num_blocks, runner.block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=max(8192, batch),
                                      block_size=runner.block_size,
                                      max_model_len=runner.max_model_len, async_output=True), pool)
    greedy = RequestSampling(temperature=0.0)
    sampling: dict[str, RequestSampling] = {}
    for i, p in enumerate(prompts(batch, isl, runner.cfg.vocab_size)):
        sampling[f"x{i}"] = greedy
        sched.add(Sequence(f"x{i}", p, StopRule(max_tokens=osl, ignore_eos=True)))
    totals = dict.fromkeys(PHASES, 0.0)
    steps = 0
    inflight = None
    with torch.inference_mode():
        while sched.has_work() or inflight is not None:
            t0 = clock()
            out = sched.schedule() if sched.has_work() else None
            t1 = clock()
            inputs = runner.prepare(out.scheduled) if out is not None and out.scheduled else None
            t2 = clock()
            launched = (runner.launch(inputs, sampling, greedy_plain=True)
                        if inputs is not None else None)
            t3 = clock()
            result = runner.collect(inflight[1]) if inflight is not None and inflight[1] else None
            t4 = clock()
            if inflight is not None:
                sched.update(result.sampled if result is not None else {})
            t5 = clock()
            full = out is not None and len(out.scheduled) == batch and all(
                not s.is_prefill for s in out.scheduled)
            if full:
                if profiler is not None and steps == 2:
                    profiler.enable()
                steps += 1
                for name, a, b in zip(PHASES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5),
                                      strict=True):
                    totals[name] += b - a
            inflight = (out, launched) if out is not None else None
    if profiler is not None:
        profiler.disable()
    return {k: 1e3 * v / max(steps, 1) for k, v in totals.items()} | {"steps": steps}


async def engine_steps(model: Path, batch: int, isl: int, osl: int, stream_interval: int = 1,
                       device_ms: float = 0.0) -> tuple[float, float, float, float]:
    """(decode steps/s, ms of the model per step, process CPU ms per step (all threads), of
    which the engine thread's), over the steady decode of the run: from stream 0's 8th token
    to its last output at least 4 tokens before the end (every stream decodes in lockstep)."""
    from kvflow.engines.native.engine import NativeEngine
    from kvflow.llm.protocol import PreprocessedRequest, SamplingOptions, StopConditions
    from kvflow.runtime.context import Context

    original = ModelRunner._capture_graphs
    ModelRunner._capture_graphs = eager_graphs  # type: ignore[method-assign,assignment]
    try:
        cfg = config(model, batch, isl + osl + 16)
        if stream_interval != 1:  # (left out at 1, so the bench also runs on older checkouts)
            cfg = dataclasses.replace(cfg, stream_interval=stream_interval)
        engine = NativeEngine(cfg)
        await engine.start()
    finally:
        ModelRunner._capture_graphs = original  # type: ignore[method-assign]
    assert engine.runner is not None and engine._thread is not None and engine._thread.ident
    if device_ms:
        engine.runner.readback = SimulatedDevice(device_ms)  # type: ignore[assignment]
    engine_clock = time.pthread_getcpuclockid(engine._thread.ident)
    # stream 0's outputs: (tokens so far, wall, process CPU, engine thread CPU)
    marks: list[tuple[int, float, float, float]] = []
    received = [0] * batch

    async def one(i: int, prompt: list[int]) -> None:
        req = PreprocessedRequest(request_id=f"e{i}", token_ids=prompt,
                                  sampling=SamplingOptions(temperature=0.0),
                                  stop=StopConditions(max_tokens=osl, ignore_eos=True))
        async for out in engine.generate(req, Context()):
            received[i] += len(out.token_ids)
            if i == 0:
                marks.append((received[0], time.perf_counter(), time.process_time(),
                              time.clock_gettime(engine_clock)))

    await asyncio.gather(*(one(i, p) for i, p in
                           enumerate(prompts(batch, isl, engine.runner.cfg.vocab_size))))
    assert received == [osl] * batch, "a stream lost or gained tokens"
    first = next(m for m in marks if m[0] >= 8)
    last = [m for m in marks if m[0] <= osl - 4][-1]
    steps = last[0] - first[0]
    assert steps > 0, "--osl is too short for a steady window"
    fwd = model_ms(engine.runner, batch)
    await engine.stop()
    return (steps / (last[1] - first[1]), fwd, 1e3 * (last[2] - first[2]) / steps,
            1e3 * (last[3] - first[3]) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--isl", type=int, default=64)
    parser.add_argument("--osl", type=int, default=48)
    parser.add_argument("--reps", type=int, default=1,
                        help="passes of the phases loop; each phase's fastest is printed")
    parser.add_argument("--profile", action="store_true", help="cProfile of the phases loop")
    parser.add_argument("--engine", type=int, default=0, metavar="N",
                        help="also run the whole engine N times")
    parser.add_argument("--stream-interval", type=int, default=1, metavar="K",
                        help="the engine's --stream-interval (tokens per stream output)")
    parser.add_argument("--uvloop", action="store_true", help="run the engine on uvloop")
    parser.add_argument("--device-ms", type=float, default=0.0, metavar="MS",
                        help="--engine with a simulated device taking MS per step (the H200's"
                             " eager b=256 step of the 1.1B bench model: 2.67)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = make_tiny_model(Path(tempfile.mkdtemp(prefix="kvflow-host-")), "llama",
                            hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, vocab_size=512, max_position_embeddings=4096)
    runner = ModelRunner.load(config(model, args.batch, args.isl + args.osl + 16))
    runner.graphs = eager_graphs(runner)
    fwd = model_ms(runner, args.batch)
    ph = phases(runner, args.batch, args.isl, args.osl, None)
    for _ in range(args.reps - 1):  # each phase's best pass (the machine may be shared)
        fwd = min(fwd, model_ms(runner, args.batch))
        ph = {k: min(v, ph[k]) for k, v in phases(runner, args.batch, args.isl, args.osl,
                                                   None).items()}
    host = sum(ph[k] for k in PHASES) - fwd
    print(f"batch {args.batch} (thread CPU ms/step): " + " ".join(f"{k}={ph[k]:.3f}" for k in PHASES)
          + f" ms/step over {ph['steps']:.0f} steps (best of {args.reps});"
          f" stand-in model (in launch) {fwd:.3f} ms;"
          f" host work {host:.3f} ms/step")
    if args.profile:  # a second pass, so the profiler's overhead stays out of the figures
        profiler = cProfile.Profile()
        phases(runner, args.batch, args.isl, args.osl, profiler)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    run_loop = asyncio.run
    if args.uvloop:
        import uvloop

        run_loop = uvloop.run
    for _ in range(args.engine):
        rate, fwd, cpu, eng = run_loop(engine_steps(model, args.batch, args.isl, args.osl,
                                                    args.stream_interval, args.device_ms))
        print(f"engine batch {args.batch}: {rate:.1f} decode steps/s = {1e3 / rate:.3f} ms/step"
              f" (wall); process CPU {cpu:.3f} ms/step, of which stand-in model {fwd:.3f};"
              f" host {cpu - fwd:.3f} ms/step (engine thread {eng - fwd:.3f}, event loop and"
              f" the rest {cpu - eng:.3f})"
              + (f"; wall over the {args.device_ms} ms device step:"
                 f" {1e3 / rate - args.device_ms:.3f} ms" if args.device_ms else ""))


if __name__ == "__main__":
    main()
