"""Disaggregated vs aggregated serving on the mocker at realistic speed: goodput per configuration.

    PYTHONPATH=. .venv/bin/python bench/disagg.py [--quick] [--workloads long,short]

Four simulated H100s (the mocker's default timing: an 8B model) in one process, behind
the real pipeline minus HTTP: ModelWatcher -> DisaggClient -> KV routers -> request
plane -> worker instances (prefill blocks really move between the workers' KV memories
through the transfer agents; the mocker adds the modelled wire time at 25 GB/s).

Configurations: agg4 (4 aggregated workers), 2P2D and 1P3D (--disagg-mode always), and
cond-2P2D / cond-1P3D (--disagg-mode conditional, the default rule and flags).
Workloads: long (ISL 3000 / OSL 150) and short (ISL 200 / OSL 200), random prompts,
Poisson arrivals at rising rates (simulated requests/s); all times are reported in
simulated seconds. Both workloads run in slow motion (--speedup < 1) so
that event-loop lag on a loaded 2-core machine stays small against the 40 ms ITL target.
A request is good when its TTFT <= 1 s and its ITL p90 <= 40 ms; goodput at a rate =
rate x fraction of good requests. Per workload the best goodput of
each configuration is printed with its ratio against agg4 and against the best fixed
configuration. Every engine runs with --max-num-seqs (default 64) so that the fleet
saturates at rates this machine can simulate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import selectors
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kvflow.engines.base import get_engine
from kvflow.engines.worker import parse_args, serve_instance, worker_args
from kvflow.frontend.disagg import DisaggConfig
from kvflow.frontend.models import ModelManager
from kvflow.frontend.watcher import ModelWatcher
from kvflow.llm.protocol import PreprocessedRequest, StopConditions
from kvflow.router.config import KvRouterConfig
from kvflow.runtime import Context, DistributedRuntime, RuntimeConfig
from kvflow.testing.tokenizer import make_model_dir

TTFT_SLO, ITL_SLO = 1.0, 0.040
CONFIGS = {  # name -> (prefill workers, decode/aggregated workers, disagg mode)
    "agg4": (0, 4, "never"),
    "2P2D": (2, 2, "always"),
    "1P3D": (1, 3, "always"),
    "cond-2P2D": (2, 2, "conditional"),
    "cond-1P3D": (1, 3, "conditional"),
}


@dataclass(frozen=True)
class Workload:
    name: str
    isl: int
    osl: int
    rates: tuple[float, ...]
    speedup: float
    requests: int


@dataclass
class Point:
    rate: float
    good: int
    total: int
    makespan: float
    ttft_p90: float
    itl_p90: float

    @property
    def goodput(self) -> float:
        """Offered requests/s that met both SLOs (rate x fraction good)."""
        return self.rate * self.good / self.total if self.total else 0.0


@dataclass
class Result:
    ttft: float
    gaps: list[float]


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else (values or [0.0])[0]


class _VirtualSelector:
    """Wraps the loop's selector: when nothing is ready, time jumps to the next timer."""

    def __init__(self, selector: selectors.BaseSelector, loop: VirtualClockLoop) -> None:
        self._selector, self._loop = selector, loop

    def select(self, timeout: float | None = None) -> list:
        if timeout is not None and timeout <= 0:
            return self._selector.select(0)
        events = self._selector.select(_REAL_GRACE_S)  # loopback I/O, worker threads
        if not events and timeout is not None:
            self._loop.now += timeout
        elif not events:
            events = self._selector.select(None)
        return events

    def __getattr__(self, name: str) -> object:
        return getattr(self._selector, name)


_REAL_GRACE_S = 0.0005


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is simulated time: idle waits cost no wall time."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self._selector = _VirtualSelector(self._selector, self)  # type: ignore[assignment]

    def time(self) -> float:
        return self.now


class Stack:
    """One configuration: worker instances and a watcher on a private in-process runtime."""

    def __init__(self, prefill: int, decode: int, mode: str, speedup: float, args: argparse.Namespace,
                 model_dir: Path) -> None:
        self.roles = ["prefill"] * prefill + ["decode" if prefill else "aggregated"] * decode
        self.mode, self.speedup, self.args, self.model_dir = mode, speedup, args, model_dir
        self.tasks: list[asyncio.Future] = []

    async def start(self) -> None:
        config = RuntimeConfig(namespace="bench" + uuid.uuid4().hex[:6], discovery="memory",
                               event_plane="inproc")
        self.runtime = await DistributedRuntime(config).start()
        for role in self.roles:
            ns = parse_args([
                "--engine", "mocker", "--model-path", str(self.model_dir), "--model-name", "m",
                "--role", role, "--speedup-ratio", str(self.speedup),
                "--max-num-seqs", str(self.args.max_num_seqs)])
            iid = self.runtime.new_instance_id()
            self.tasks.append(asyncio.ensure_future(serve_instance(
                self.runtime, get_engine("mocker"), ns, worker_args(ns), iid)))
        self.models = ModelManager()
        self.watcher = ModelWatcher(self.runtime, self.models, KvRouterConfig(),
                                    disagg=DisaggConfig(mode=self.mode))
        await self.watcher.start()
        await self._ready()

    async def _ready(self) -> None:
        want_prefill = self.roles.count("prefill")
        for _ in range(600):
            pool = self.watcher.pools.get("m")
            prefill = self.watcher.disagg.prefill_for("m")
            if (pool is not None and pool.routed.live_workers() == len(self.roles) - want_prefill
                    and (not want_prefill or (prefill and prefill.live_workers() == want_prefill))):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("the stack did not come up")

    async def stop(self) -> None:
        await self.watcher.close()
        self.runtime.initiate_shutdown()
        for task in self.tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        await self.runtime.shutdown()

    async def one(self, rid: str, ids: list[int], osl: int) -> Result:
        model = self.models.get("m")
        assert model is not None
        request = PreprocessedRequest(rid, ids, stop=StopConditions(max_tokens=osl, ignore_eos=True))
        loop = asyncio.get_running_loop()
        start = last = loop.time()
        ttft, gaps = -1.0, []
        async for out in model.engine.generate(request, Context()):
            now, n = loop.time(), len(out.token_ids)
            if n and ttft < 0:
                ttft = now - start
            elif n:
                gaps += [(now - last) / n] * n
            last = now if n else last
        return Result(ttft * self.speedup, [g * self.speedup for g in gaps])


async def run_point(stack: Stack, w: Workload, rate: float, seed: int) -> Point:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    tasks = []
    start = loop.time()
    for i in range(w.requests):
        ids = [rng.randrange(3, 30000) for _ in range(w.isl)]
        tasks.append(asyncio.ensure_future(stack.one(f"{w.name}-{rate}-{i}", ids, w.osl)))
        await asyncio.sleep(rng.expovariate(rate) / stack.speedup)
    results = await asyncio.gather(*tasks)
    makespan = (loop.time() - start) * stack.speedup
    good = sum(r.ttft <= TTFT_SLO and p90(r.gaps) <= ITL_SLO for r in results)
    return Point(rate, good, len(results), makespan, p90([r.ttft for r in results]),
                 p90([g for r in results for g in r.gaps]))


async def run_workload(w: Workload, args: argparse.Namespace, model_dir: Path) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for name in args.configs.split(","):
        prefill, decode, mode = CONFIGS[name]
        stack = Stack(prefill, decode, mode, w.speedup, args, model_dir)
        await stack.start()
        try:
            out[name] = []
            for rate in w.rates:
                point = await run_point(stack, w, rate, seed=int(rate * 1000))
                out[name].append(point)
                print(f"  {w.name:5s} {name:9s} rate {rate:6.1f}/s  goodput {point.goodput:6.2f}/s "
                      f"({point.good}/{point.total} good)  TTFT p90 {point.ttft_p90 * 1000:7.0f} ms"
                      f"  ITL p90 {point.itl_p90 * 1000:5.1f} ms", flush=True)
        finally:
            await stack.stop()
    return out


def summarize(w: Workload, results: dict[str, list[Point]]) -> None:
    best = {name: max(p.goodput for p in points) for name, points in results.items()}
    fixed = max((v for k, v in best.items() if not k.startswith("cond")), default=0.0)
    base = best.get("agg4", 0.0)
    print(f"\n{w.name} (ISL {w.isl} / OSL {w.osl}): best goodput (req/s meeting TTFT p90 <= 1 s, "
          f"ITL p90 <= 40 ms)")
    for name, value in best.items():
        vs_agg = f"{value / base:5.2f}x agg4" if base else "   -"
        vs_fixed = f"{value / fixed:5.2f}x best fixed" if fixed else ""
        print(f"  {name:9s} {value:7.2f} req/s   {vs_agg}   {vs_fixed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="long,short")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--long-rates", default="10,20,30")
    parser.add_argument("--short-rates", default="80,160")
    parser.add_argument("--requests", type=int, default=150, help="requests per rate point (long)")
    parser.add_argument("--long-speedup", type=float, default=1.0)
    parser.add_argument("--short-speedup", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="fewer points (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.long_rates, args.short_rates, args.requests = "16,28", "120", 80
    workloads = {
        "long": Workload("long", 3000, 150, _rates(args.long_rates), args.long_speedup,
                         args.requests),
        "short": Workload("short", 200, 200, _rates(args.short_rates), args.short_speedup,
                          args.requests * 2),
    }
    model_dir = make_model_dir(Path(tempfile.mkdtemp(prefix="bench-disagg-")) / "tiny")
    started = time.perf_counter()
    for name in args.workloads.split(","):
        w = workloads[name]
        print(f"workload {name}: ISL {w.isl} OSL {w.osl}, {w.requests} requests per point, "
              f"speedup {w.speedup}", flush=True)
        with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
            summarize(w, runner.run(run_workload(w, args, model_dir)))
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


def _rates(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


if __name__ == "__main__":
    main()
