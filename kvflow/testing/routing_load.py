"""Routing-quality load for tests and bench/routing.py: seeded workloads, an HTTP driver, figures.

A workload is a list of sessions; a session is turns sent one after another (a one-turn
session is an independent request). `clients` sessions run at once. Prompts are token
ids sent to /v1/completions, so their shared prefixes are exact; session turns carry an
`x-session-id` header. The driver records, per request, the engine-reported cached
tokens, TTFT and the gaps between streamed chunks. `ideal_cached_fraction` is what a
router with perfect affinity could reach: each prompt hits the longest full-block prefix
some earlier prompt of the workload (in list order) already computed.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

import openai

from kvflow.llm.kv_hash import sequence_hashes

SESSION_HEADER = "x-session-id"


@dataclass(frozen=True)
class Turn:
    prompt: list[int]
    max_tokens: int
    # Seconds the user thinks before sending this turn (after the previous one ended).
    delay_s: float = 0.0


@dataclass(frozen=True)
class Session:
    turns: list[Turn]
    # Sent as the x-session-id header when set.
    key: str | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: list[Session]
    clients: int

    def prompts(self) -> list[list[int]]:
        return [t.prompt for s in self.sessions for t in s.turns]


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(16, vocab) for _ in range(n)]


def shared_prefix(seed: int, groups: int, per_group: int, prefix: int, suffix: int,
                  max_tokens: int, clients: int, vocab: int = 500) -> Workload:
    """`groups` long system prompts, `per_group` requests each, groups interleaved at random."""
    rng = random.Random(seed)
    heads = [_tokens(rng, prefix, vocab) for _ in range(groups)]
    order = [g for g in range(groups) for _ in range(per_group)]
    rng.shuffle(order)
    sessions = [Session([Turn(heads[g] + _tokens(rng, suffix, vocab), max_tokens)])
                for g in order]
    return Workload("shared_prefix", sessions, clients)


def multi_turn(seed: int, users: int, turns: int, first: int, user_msg: int, reply: int,
               max_tokens: int, clients: int, vocab: int = 500,
               think_s: float = 0.3) -> Workload:
    """Each user replays a conversation: every turn is the history plus a new message,
    sent after a seeded think time of up to `think_s` (users do not move in lockstep)."""
    rng = random.Random(seed)
    sessions = []
    for u in range(users):
        history = _tokens(rng, first, vocab)
        convo = [Turn(list(history), max_tokens)]
        for _ in range(turns - 1):
            history += _tokens(rng, reply, vocab) + _tokens(rng, user_msg, vocab)
            convo.append(Turn(list(history), max_tokens, rng.uniform(0, think_s)))
        sessions.append(Session(convo, key=f"user-{seed}-{u}"))
    return Workload("multi_turn", sessions, clients)


def uniform(seed: int, requests: int, length: int, max_tokens: int, clients: int,
            vocab: int = 500) -> Workload:
    """Prefix-free prompts of one length: nothing to cache, only load to balance."""
    rng = random.Random(seed)
    sessions = [Session([Turn(_tokens(rng, length, vocab), max_tokens)])
                for _ in range(requests)]
    return Workload("uniform", sessions, clients)


def mixed(name: str, parts: list[Workload], seed: int) -> Workload:
    """The parts' sessions interleaved at random, with their clients added up."""
    sessions = [s for w in parts for s in w.sessions]
    random.Random(seed).shuffle(sessions)
    return Workload(name, sessions, sum(w.clients for w in parts))


def ideal_cached_fraction(workload: Workload, block_size: int) -> float:
    """Cached prompt tokens / prompt tokens if every prompt met its longest computed prefix."""
    seen: set[int] = set()
    cached = total = 0
    for prompt in workload.prompts():
        hashes = sequence_hashes(prompt, block_size)
        limit = (len(prompt) - 1) // block_size  # engines compute the last token
        hits = 0
        while hits < limit and hashes[hits] in seen:
            hits += 1
        cached += hits * block_size
        total += len(prompt)
        seen.update(hashes)
    return cached / total if total else 0.0


@dataclass
class LoadStats:
    """What one run of a workload measured, from outside, over HTTP."""

    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def cached_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def figures(self) -> dict[str, float]:
        return {
            "cached": round(self.cached_fraction, 3),
            "ttft_p50_ms": round(1000 * percentile(self.ttft_s, 50), 1),
            "ttft_p99_ms": round(1000 * percentile(self.ttft_s, 99), 1),
            "itl_p50_ms": round(1000 * percentile(self.itl_s, 50), 2),
            "out_tok_s": round(self.output_tokens / self.seconds, 1) if self.seconds else 0.0,
            "req_s": round(self.requests / self.seconds, 2) if self.seconds else 0.0,
            "failed": self.failed,
        }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(max(int(p), 1), 99) - 1]


async def run_workload(base_url: str, model: str, workload: Workload) -> LoadStats:
    """Send the workload with `workload.clients` sessions in flight; streaming, usage on."""
    stats = LoadStats()
    pending = iter(workload.sessions)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                  timeout=120) as client:

        async def worker() -> None:
            for session in pending:  # shared iterator: each session goes to one client
                for turn in session.turns:
                    if turn.delay_s:
                        await asyncio.sleep(turn.delay_s)
                    await _one(client, model, turn, session.key, stats)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workload.clients)))
        stats.seconds = time.perf_counter() - start
    return stats


async def _one(client: openai.AsyncOpenAI, model: str, turn: Turn, key: str | None,
               stats: LoadStats) -> None:
    headers = {SESSION_HEADER: key} if key else None
    start = last = time.perf_counter()
    first = 0.0
    gaps: list[float] = []
    usage = None
    try:
        stream = await client.completions.create(
            model=model, prompt=turn.prompt, max_tokens=turn.max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            extra_headers=headers)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                if first:
                    gaps.append(now - last)
                else:
                    first = now - start
                last = now
            if chunk.usage:
                usage = chunk.usage
    except openai.OpenAIError as exc:
        stats.failed += 1
        stats.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        return
    if usage is None:
        stats.failed += 1
        stats.errors.append("stream ended without usage")
        return
    stats.requests += 1
    stats.prompt_tokens += usage.prompt_tokens
    details = usage.prompt_tokens_details
    stats.cached_tokens += (details.cached_tokens or 0) if details else 0
    stats.output_tokens += usage.completion_tokens
    stats.ttft_s.append(first)
    stats.itl_s.extend(gaps)
