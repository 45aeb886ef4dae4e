"""Routing quality: cached fraction, TTFT, ITL and throughput per router mode, on real processes.

    .venv/bin/python bench/routing.py [--modes kv round-robin least-loaded] [--workers 4]
        [--workloads shared_prefix multi_turn mixed uniform] [--scale 1.0] [--trace FILE]

For each router mode, a fresh stack (a real `kvflow frontend --router-mode MODE` and
`--workers` mocker worker processes at speedup 1, i.e. realistic step times) serves the
same seeded workloads, one after another (kvflow.testing.routing_load):
  shared_prefix  groups of requests sharing a long system prompt, groups interleaved;
  multi_turn     users replaying conversations turn by turn (x-session-id header);
  mixed          both at once (other seeds);
  uniform        prefix-free prompts of one length (only load to balance).
Reported per mode and workload: engine-reported cached fraction (cached / prompt tokens),
the workload's ideal cached fraction, TTFT p50/p99, ITL p50, output tokens/s, requests/s.
With `--repeat R` the modes run R times, interleaved (kv, rr, ll, kv, ...: a loaded
machine's drift hits every mode alike), and each figure is the median over the repeats.
Ratios against round robin (same invocation) close the report.
`--trace FILE` also writes `/debug/route` answers for a few prompts probed mid-run.
`--scale` multiplies request counts (keep the whole run to a few minutes on 2 cores).
Each worker's KV cache is `--gpu-blocks` (1024 blocks of 16 tokens): the workloads'
working sets fit when each prefix lives on one worker, not when every worker copies
every prefix, the pressure a fleet's cache is under when traffic is many times larger
than these few hundred requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from kvflow.testing.procs import Proc, kvflow_proc, live_workers, runtime_env
from kvflow.testing.routing_load import (
    LoadStats,
    Workload,
    ideal_cached_fraction,
    mixed,
    multi_turn,
    run_workload,
    shared_prefix,
    uniform,
)
from kvflow.testing.tokenizer import make_model_dir

MODEL = "m"
BLOCK_SIZE = 16


def workloads(scale: float) -> dict[str, Workload]:
    def n(x: int) -> int:
        return max(1, round(x * scale))

    sp = shared_prefix(seed=1, groups=8, per_group=n(12), prefix=2048, suffix=128,
                       max_tokens=16, clients=16)
    mt = multi_turn(seed=2, users=n(16), turns=6, first=512, user_msg=192, reply=64,
                    max_tokens=16, clients=16)
    mix = mixed("mixed", [
        shared_prefix(seed=3, groups=6, per_group=n(8), prefix=1536, suffix=128,
                      max_tokens=16, clients=8),
        multi_turn(seed=4, users=n(8), turns=5, first=512, user_msg=192, reply=64,
                   max_tokens=16, clients=8),
    ], seed=5)
    uni = uniform(seed=6, requests=n(96), length=1024, max_tokens=16, clients=16)
    return {w.name: w for w in (sp, mt, mix, uni)}


class Stack:
    """A frontend and mocker workers as child processes, on a private discovery dir."""

    def __init__(self, tmp: Path, workers: int, mode: str, gpu_blocks: int) -> None:
        self.gpu_blocks = gpu_blocks
        self.model_dir = make_model_dir(tmp / "model", max_position_embeddings=32768)
        self.env = runtime_env(discovery="file", discovery_path=tmp / "discovery",
                               namespace="routing" + uuid.uuid4().hex[:6],
                               file_poll_interval=0.05)
        self.log_dir = tmp / "logs"
        self.n_workers = workers
        self.mode = mode
        self.procs: list[Proc] = []
        self.url = ""

    def start(self) -> None:
        mode, _, extra = self.mode.partition(":")  # "kv:--router-pending-ttl-s=0,..."
        flags = [f for f in extra.split(",") if f]
        front = kvflow_proc("frontend", "--http-port", "0", "--router-mode", mode, *flags,
                            env=self.env, log_dir=self.log_dir, name="frontend")
        self.procs.append(front)
        front.wait_for_output("frontend: listening on", timeout=60)
        found = re.search(r"listening on (http://\S+)", front.output())
        assert found is not None
        self.url = found.group(1)
        for _ in range(self.n_workers):
            self.procs.append(kvflow_proc(
                "worker", "--engine", "mocker", "--model-path", str(self.model_dir),
                "--model-name", MODEL, "--speedup-ratio", "1", "--block-size", str(BLOCK_SIZE),
                "--num-gpu-blocks", str(self.gpu_blocks),
                env=self.env, log_dir=self.log_dir, name="worker"))

    async def wait_workers(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while self.live_workers() != self.n_workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.live_workers()} workers registered, wanted "
                                   f"{self.n_workers}; logs in {self.log_dir}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # let the router subscribe to every worker's events

    def live_workers(self) -> int:
        return live_workers(self.url, MODEL)

    def explain(self, prompt: list[int]) -> dict:
        body = json.dumps({"model": MODEL, "prompt": prompt}).encode()
        req = urllib.request.Request(self.url + "/debug/route", body,
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


async def trace_decisions(stack: Stack, workload: Workload, out: list[dict]) -> None:
    """Probe /debug/route for upcoming prompts while the workload runs (changes nothing)."""
    prompts = workload.prompts()
    for i in range(0, len(prompts), max(1, len(prompts) // 12)):
        await asyncio.sleep(0.4)
        answer = await asyncio.to_thread(stack.explain, prompts[i])
        out.append({"mode": stack.mode, "workload": workload.name, "probe": i, **answer})


async def run_mode(mode: str, args: argparse.Namespace, loads: dict[str, Workload],
                   traces: list[dict]) -> dict[str, LoadStats]:
    stack = Stack(Path(tempfile.mkdtemp(prefix="kvflow-routing-")), args.workers, mode,
                  args.gpu_blocks)
    results: dict[str, LoadStats] = {}
    try:
        stack.start()
        await stack.wait_workers()
        warm = uniform(seed=99, requests=4, length=64, max_tokens=4, clients=4)
        await run_workload(stack.url + "/v1", MODEL, warm)
        for name, workload in loads.items():
            tracer = (asyncio.ensure_future(trace_decisions(stack, workload, traces))
                      if args.trace else None)
            results[name] = await run_workload(stack.url + "/v1", MODEL, workload)
            if tracer is not None:
                tracer.cancel()
            print(f"  {mode:<13} {name:<14} {_row(results[name].figures())}", flush=True)
    finally:
        stack.stop()
    return results


class MedianStats(LoadStats):
    """Figures that are medians of several runs' figures."""

    def __init__(self, runs: list[LoadStats]) -> None:
        super().__init__()
        self._figures = {k: statistics.median(r.figures()[k] for r in runs)
                         for k in runs[0].figures()}

    def figures(self) -> dict[str, float]:
        return dict(self._figures)


def median_stats(runs: list[LoadStats]) -> LoadStats:
    return runs[0] if len(runs) == 1 else MedianStats(runs)


def _row(figures: dict[str, float]) -> str:
    return " ".join(f"{k}={v}" for k, v in figures.items())


def report(all_results: dict[str, dict[str, LoadStats]], loads: dict[str, Workload]) -> None:
    print(f"\n{'workload':<14} {'mode':<13} {'ideal':>6} {'cached':>7} {'ttft50':>8} "
          f"{'ttft99':>8} {'itl50':>7} {'tok/s':>8} {'req/s':>6} {'fail':>4}")
    for name, workload in loads.items():
        ideal = ideal_cached_fraction(workload, BLOCK_SIZE)
        for mode, results in all_results.items():
            f = results[name].figures()
            print(f"{name:<14} {mode:<13} {ideal:>6.3f} {f['cached']:>7.3f} "
                  f"{f['ttft_p50_ms']:>8.1f} {f['ttft_p99_ms']:>8.1f} {f['itl_p50_ms']:>7.2f} "
                  f"{f['out_tok_s']:>8.1f} {f['req_s']:>6.2f} {f['failed']:>4}")
    kv, rr, ll = (all_results.get(m) for m in ("kv", "round-robin", "least-loaded"))
    if kv is None or rr is None:
        return
    print("\nkv against round robin (same run):")
    for name, workload in loads.items():
        a, b = kv[name].figures(), rr[name].figures()
        ideal = ideal_cached_fraction(workload, BLOCK_SIZE)
        of_ideal = f"{a['cached'] / ideal:.2f}" if ideal else "-"
        print(f"  {name:<14} cached {a['cached']:.3f} / rr {b['cached']:.3f} = "
              f"{a['cached'] / max(b['cached'], 1e-9):.2f}x; of ideal {of_ideal}; "
              f"ttft p99 {a['ttft_p99_ms'] / b['ttft_p99_ms']:.2f}x; "
              f"tok/s {a['out_tok_s'] / b['out_tok_s']:.2f}x")
    if ll is not None and "uniform" in loads:
        a, c = kv["uniform"].figures(), ll["uniform"].figures()
        print(f"  uniform ttft p99 kv / least-loaded = {a['ttft_p99_ms'] / c['ttft_p99_ms']:.2f}x")


async def bench(args: argparse.Namespace) -> None:
    loads = workloads(args.scale)
    loads = {k: v for k, v in loads.items() if k in args.workloads}
    for name, w in loads.items():
        print(f"workload {name}: {len(w.prompts())} requests, {w.clients} clients, ideal cached "
              f"fraction {ideal_cached_fraction(w, BLOCK_SIZE):.3f}")
    traces: list[dict] = []
    runs: dict[str, list[dict[str, LoadStats]]] = {m: [] for m in args.modes}
    for _ in range(args.repeat):
        for mode in args.modes:
            runs[mode].append(await run_mode(mode, args, loads, traces))
    all_results = {m: {name: median_stats([r[name] for r in rs]) for name in loads}
                   for m, rs in runs.items()}
    report(all_results, loads)
    if args.trace:
        Path(args.trace).write_text("\n".join(json.dumps(t) for t in traces) + "\n")
        print(f"/debug/route traces: {args.trace}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["kv", "round-robin", "least-loaded"],
                    help="router modes; MODE:FLAG=V,FLAG=V adds frontend flags "
                    "(e.g. kv:--router-decode-load-scale=1)")
    ap.add_argument("--workloads", nargs="+",
                    default=["shared_prefix", "multi_turn", "mixed", "uniform"])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies request counts")
    ap.add_argument("--gpu-blocks", type=int, default=1024,
                    help="KV blocks per mocker worker: small, so that (as in production, "
                    "where traffic outgrows caches) copying every prefix to every worker evicts")
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode (medians reported)")
    ap.add_argument("--trace", help="write /debug/route probes (JSON lines) to this file")
    asyncio.run(bench(ap.parse_args()))


if __name__ == "__main__":
    main()
