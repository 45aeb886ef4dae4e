"""Router micro-benchmark: find_matches and schedule latency p50/p99 vs a brute-force index.

    .venv/bin/python bench/router.py [--workers 16 64 256] [--blocks 128] [--iters 2000]

For each fleet size, every worker caches a random-length prefix of the query prompt
plus `--other-blocks` unrelated blocks; the "worst" case has every worker hold the
whole prompt. The baseline is the obvious index (a set of hashes per worker, scanned
worker by worker); both run in this invocation and the ratio is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from prometheus_client import CollectorRegistry

from kvflow.llm.kv_events import BlocksStored, CacheSnapshot, KvEvent, StoredBlock
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.router import KvRouter, KvRouterConfig
from kvflow.router.indexer import KvIndex

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Percentiles:
    p50_us: float
    p99_us: float


class BruteForceIndex:
    """Per worker a set of hashes; matching scans every worker."""

    def __init__(self) -> None:
        self.held: dict[int, set[int]] = {}

    def store(self, worker: int, hashes: Sequence[int]) -> None:
        self.held.setdefault(worker, set()).update(hashes)

    def find_matches(self, hashes: Sequence[int]) -> dict[int, int]:
        scores = {}
        for worker, held in self.held.items():
            n = 0
            for h in hashes:
                if h not in held:
                    break
                n += 1
            if n:
                scores[worker] = n
        return scores


def percentiles(samples: list[float]) -> Percentiles:
    qs = statistics.quantiles(samples, n=100)
    return Percentiles(qs[49] * 1e6, qs[98] * 1e6)


def time_calls(fn: Callable[[], object], iters: int) -> Percentiles:
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def populate(workers: int, prompt: list[int], other: int, worst: bool, rng: random.Random) -> (
    tuple[KvIndex, BruteForceIndex]
):
    query = sequence_hashes(prompt, BLOCK_SIZE)
    index, brute = KvIndex(), BruteForceIndex()
    for w in range(workers):
        depth = len(query) if worst else rng.randint(0, len(query))
        hashes = query[:depth] + [rng.getrandbits(64) for _ in range(other)]
        index.apply(KvEvent(w, 1, BlocksStored([StoredBlock(h, []) for h in hashes])))
        brute.store(w, hashes)
    return index, brute


async def time_schedule(index_events: KvIndex, workers: int, prompt: list[int],
                        iters: int) -> Percentiles:
    async def no_snapshot(worker_id: int) -> CacheSnapshot:
        raise RuntimeError("the benchmark sends no gaps")

    router = KvRouter(KvRouterConfig(block_size=BLOCK_SIZE, seed=0), no_snapshot,
                      registry=CollectorRegistry())
    for w in range(workers):
        router.on_worker_added(w)
    query = sequence_hashes(prompt, BLOCK_SIZE)
    for w in range(workers):
        depth = index_events.find_matches(query).score(w)
        router.on_kv_events([KvEvent(w, 1, BlocksStored([StoredBlock(h, [])
                                                         for h in query[:depth]]))])
    samples = []
    for i in range(iters):
        start = time.perf_counter()
        await router.schedule(prompt, f"r{i}")
        samples.append(time.perf_counter() - start)
        router.on_finished(f"r{i}")
    return percentiles(samples)


def run(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    prompt = [rng.randrange(32000) for _ in range(args.blocks * BLOCK_SIZE)]
    query = sequence_hashes(prompt, BLOCK_SIZE)
    hashing = time_calls(lambda: sequence_hashes(prompt, BLOCK_SIZE), args.iters)
    print(f"prompt: {len(prompt)} tokens, {len(query)} blocks; hashing p50 "
          f"{hashing.p50_us:.1f} us p99 {hashing.p99_us:.1f} us")
    print(f"{'workers':>7} {'case':>6} {'index p50':>10} {'p99':>8} {'brute p50':>10} "
          f"{'p99':>8} {'speedup':>8} {'schedule p50':>13} {'p99':>8}  (us)")
    for workers in args.workers:
        for worst in (False, True):
            index, brute = populate(workers, prompt, args.other_blocks, worst, rng)
            assert index.find_matches(query).scores == brute.find_matches(query)
            fast = time_calls(partial(index.find_matches, query), args.iters)
            slow = time_calls(partial(brute.find_matches, query), max(args.iters // 4, 50))
            sched = asyncio.run(time_schedule(index, workers, prompt, args.iters // 2))
            print(f"{workers:>7} {'worst' if worst else 'mixed':>6} {fast.p50_us:>10.1f} "
                  f"{fast.p99_us:>8.1f} {slow.p50_us:>10.1f} {slow.p99_us:>8.1f} "
                  f"{slow.p50_us / fast.p50_us:>7.1f}x {sched.p50_us:>13.1f} "
                  f"{sched.p99_us:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--blocks", type=int, default=128)
    parser.add_argument("--other-blocks", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=2000)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
