"""Chaos under load: workers killed (-9) and restarted under steady traffic; 10x overload.

    .venv/bin/python bench/chaos.py [--duration 60] [--kill-every 10] [--workers 4]
    .venv/bin/python bench/chaos.py --scenario overload [--limit 16] [--queue 16]

Starts a real frontend and `--workers` mocker worker processes (speedup 1: realistic
step times) on a private file-discovery directory, then runs the same closed-loop load
twice in this invocation:
  1. calm: nothing happens to the workers;
  2. chaos: every `--kill-every` seconds one worker (round robin) is killed with SIGKILL
     and a replacement started at once.
Each request streams `--max-tokens` tokens (ignore_eos); one that errors or ends short
counts as failed (target: 0). Reported per run: requests completed and failed, TTFT
p50/p99, request latency p50/p99, each request's longest pause between chunks (a
migrated stream pauses while it moves) and the frontend's migrations. The chaos/calm
ratios show what the kills cost the requests that went on. A short unmeasured warmup
run comes first.

`--scenario overload` runs the frontend with --max-inflight-per-model `--limit` and
--max-queued-per-model `--queue`, then a calm run at `--limit` clients and an overload run
at 10x (limit + queue) clients, each refused client pausing `--refused-pause` before
trying again (the load generator shares the machine; it must not starve the frontend).
It reports 429s (each must carry Retry-After), the admitted requests' latency against the
calm run's, and the frontend's resident memory at the start, peak and end of each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import openai

from kvflow.testing.procs import Proc, kvflow_proc, live_workers, runtime_env
from kvflow.testing.tokenizer import make_model_dir

MODEL = "m"


@dataclass
class RunStats:
    name: str
    seconds: float
    completed: int = 0
    failed: int = 0
    refused: int = 0
    kills: int = 0
    migrations: float = 0.0
    # Means from the frontend's own histograms over the run (no client-side event-loop lag).
    server_ttft_ms: float = float("nan")
    server_itl_ms: float = float("nan")
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    # Each request's longest pause between two chunks (a migration shows up here).
    stall_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "run": self.name, "seconds": round(self.seconds, 1), "completed": self.completed,
            "failed": self.failed, "refused": self.refused, "kills": self.kills,
            "migrations": self.migrations,
            "srv_ttft_ms": round(self.server_ttft_ms, 1), "srv_itl_ms": round(self.server_itl_ms, 2),
            "req_per_s": round(self.completed / self.seconds, 2),
            "ttft_p50_ms": _ms(_pct(self.ttft_s, 50)), "ttft_p99_ms": _ms(_pct(self.ttft_s, 99)),
            "latency_p50_ms": _ms(_pct(self.latency_s, 50)),
            "latency_p99_ms": _ms(_pct(self.latency_s, 99)),
            "stall_p99_ms": _ms(_pct(self.stall_s, 99)),
            "stall_max_ms": _ms(max(self.stall_s, default=float("nan"))),
            "rss_mb_start": round(self.rss_mb[0], 1) if self.rss_mb else None,
            "rss_mb_peak": round(max(self.rss_mb), 1) if self.rss_mb else None,
            "rss_mb_end": round(self.rss_mb[-1], 1) if self.rss_mb else None,
        }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


class Stack:
    """The frontend and the workers, as child processes."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.model_dir = make_model_dir(tmp / "model")
        self.env = runtime_env(discovery="file", discovery_path=tmp / "discovery",
                               namespace="chaos" + uuid.uuid4().hex[:6],
                               lease_ttl=args.lease_ttl, file_poll_interval=0.05)
        self.log_dir = tmp / "logs"
        self.frontend: Proc | None = None
        self.workers: list[Proc] = []
        self.url = ""

    def start(self, *frontend_args: str) -> None:
        self.frontend = kvflow_proc("frontend", "--http-port", "0", *frontend_args, env=self.env,
                                    log_dir=self.log_dir, name="frontend")
        self.frontend.wait_for_output("frontend: listening on", timeout=60)
        found = re.search(r"listening on (http://\S+)", self.frontend.output())
        assert found is not None
        self.url = found.group(1)
        self.workers = [self.new_worker() for _ in range(self.args.workers)]

    def new_worker(self) -> Proc:
        return kvflow_proc("worker", "--engine", "mocker", "--model-path", str(self.model_dir),
                           "--model-name", MODEL, "--speedup-ratio", str(self.args.speedup),
                           env=self.env, log_dir=self.log_dir, name="worker")

    def live_workers(self) -> int:
        return live_workers(self.url, MODEL)

    def metrics(self) -> dict[str, float]:
        """The frontend's counters for MODEL: migrations, TTFT and ITL sums and counts."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for key, family in (("migrations", "migrations_total"),
                            ("ttft_sum", "time_to_first_token_seconds_sum"),
                            ("ttft_count", "time_to_first_token_seconds_count"),
                            ("itl_sum", "inter_token_latency_seconds_sum"),
                            ("itl_count", "inter_token_latency_seconds_count")):
            found = re.search(rf'^kvflow_frontend_{family}\{{model="{MODEL}"\}} (\S+)$', text,
                              re.MULTILINE)
            out[key] = float(found.group(1)) if found else 0.0
        return out

    def frontend_rss_mb(self) -> float:
        assert self.frontend is not None
        for line in Path(f"/proc/{self.frontend.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def kill_and_replace(self, index: int) -> None:
        self.workers[index].kill()
        self.workers[index] = self.new_worker()

    def stop(self) -> None:
        for proc in [*self.workers, self.frontend]:
            if proc is not None:
                proc.stop()


async def one_request(client: openai.AsyncOpenAI, prompt: str, args: argparse.Namespace,
                      stats: RunStats) -> None:
    try:
        await stream_one(client, prompt, args.max_tokens, stats)
    except openai.RateLimitError as exc:  # 429: overload control refused it, as it should
        stats.refused += 1
        if "retry-after" not in exc.response.headers:
            stats.failed += 1
            stats.errors.append("429 without Retry-After")
        await asyncio.sleep(args.refused_pause)


async def stream_one(client: openai.AsyncOpenAI, prompt: str, max_tokens: int,
                     stats: RunStats) -> None:
    start = time.perf_counter()
    first = stall = 0.0
    tokens = 0
    try:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        last = start
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                if first:
                    stall = max(stall, now - last)
                else:
                    first = now - start
                last = now
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except openai.RateLimitError:
        raise
    except Exception as exc:  # every failure is counted and its kind reported
        stats.failed += 1
        stats.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        return
    if tokens != max_tokens:
        stats.failed += 1
        stats.errors.append(f"short stream: {tokens} of {max_tokens} tokens")
        return
    stats.completed += 1
    stats.ttft_s.append(first)
    stats.latency_s.append(time.perf_counter() - start)
    stats.stall_s.append(stall)


async def client_loop(client: openai.AsyncOpenAI, seed: int, deadline: float,
                      args: argparse.Namespace, stats: RunStats) -> None:
    """One closed-loop client: a request, and as soon as it ends the next one."""
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        prompt = " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "omega"))
                          for _ in range(args.prompt_words))
        await one_request(client, prompt, args, stats)


async def chaos_monkey(stack: Stack, deadline: float, every: float, stats: RunStats) -> None:
    victim = 0
    while time.monotonic() + every < deadline:
        await asyncio.sleep(every)
        stack.kill_and_replace(victim % len(stack.workers))
        stats.kills += 1
        victim += 1


async def sample_rss(stack: Stack, deadline: float, stats: RunStats) -> None:
    while time.monotonic() < deadline:
        stats.rss_mb.append(stack.frontend_rss_mb())
        await asyncio.sleep(1.0)
    stats.rss_mb.append(stack.frontend_rss_mb())


async def run(stack: Stack, name: str, args: argparse.Namespace, concurrency: int,
              duration: float, kills: bool = False) -> RunStats:
    await wait_workers(stack, args.workers)
    stats = RunStats(name, duration)
    before = stack.metrics()
    deadline = time.monotonic() + duration
    async with openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused",
                                  max_retries=0, timeout=120) as client:
        loops = [client_loop(client, i, deadline, args, stats) for i in range(concurrency)]
        loops.append(sample_rss(stack, deadline, stats))
        if kills:
            loops.append(chaos_monkey(stack, deadline, args.kill_every, stats))
        start = time.monotonic()
        await asyncio.gather(*loops)
        stats.seconds = time.monotonic() - start
    after = stack.metrics()
    delta = {k: after[k] - before[k] for k in after}
    stats.migrations = delta["migrations"]
    stats.server_ttft_ms = 1000 * delta["ttft_sum"] / max(delta["ttft_count"], 1)
    stats.server_itl_ms = 1000 * delta["itl_sum"] / max(delta["itl_count"], 1)
    return stats


async def wait_workers(stack: Stack, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while stack.live_workers() != n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stack.live_workers()} workers registered, wanted {n}")
        await asyncio.sleep(0.1)


def report(runs: list[RunStats]) -> None:
    rows = [r.summary() for r in runs]
    keys = list(rows[0])
    print(" ".join(f"{k:>14}" for k in keys))
    for row in rows:
        print(" ".join(f"{row[k]!s:>14}" for k in keys))
    calm, other = runs
    for key in ("ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms",
                "stall_p99_ms", "srv_ttft_ms", "srv_itl_ms"):
        ratio = float(other.summary()[key]) / float(calm.summary()[key])  # type: ignore[arg-type]
        print(f"{other.name}/calm {key}: {ratio:.2f}x")
    for r in runs:
        for error in sorted(set(r.errors))[:5]:
            print(f"  {r.name} error: {error}")


async def bench(args: argparse.Namespace) -> list[RunStats]:
    tmp = Path(tempfile.mkdtemp(prefix="kvflow-chaos-"))
    stack = Stack(args, tmp)
    overload = args.scenario == "overload"
    if overload:
        stack.start("--max-inflight-per-model", str(args.limit),
                    "--max-queued-per-model", str(args.queue), "--queue-timeout", "30")
    else:
        stack.start()
    calm_clients = args.limit if overload else args.concurrency
    try:
        # Tokenizer, connections, prefix caches: warmed up, not measured.
        await run(stack, "warmup", args, calm_clients, args.warmup)
        calm = await run(stack, "calm", args, calm_clients, args.duration)
        if overload:
            busy = 10 * (args.limit + args.queue)
            return [calm, await run(stack, "overload", args, busy, args.duration)]
        return [calm, await run(stack, "chaos", args, args.concurrency, args.duration, True)]
    finally:
        stack.stop()
        print(f"logs: {stack.log_dir}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenario", choices=("kills", "overload"), default="kills")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per run")
    ap.add_argument("--kill-every", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--speedup", type=float, default=1.0, help="mocker speedup ratio")
    ap.add_argument("--lease-ttl", type=float, default=2.0, help="discovery lease TTL (s)")
    ap.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first")
    ap.add_argument("--limit", type=int, default=16, help="overload: in-flight per model")
    ap.add_argument("--queue", type=int, default=4, help="overload: queued per model")
    ap.add_argument("--refused-pause", type=float, default=0.5,
                    help="overload: seconds a refused client waits before its next request")
    ap.add_argument("--json", help="also write the summaries to this file")
    args = ap.parse_args()
    runs = asyncio.run(bench(args))
    report(runs)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "runs": [r.summary() for r in runs],
             "errors": {r.name: r.errors[:20] for r in runs}}, indent=2))


if __name__ == "__main__":
    main()
