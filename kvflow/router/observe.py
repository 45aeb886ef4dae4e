"""What a router saw, for the fleet view: recent decisions, hot shared prefixes, tokens per worker.

`RouterObserver` is fed by `KvRoutedClient` once per decision and once per finished
stream (never per token) and read by the frontend's fleet feed about once a second.
A prefix is "shared" once a request reuses it: each decision counts a hit on the longest
prefix any candidate already cached (its last block hash is the key); `hot_prefixes`
asks the index which workers hold each of the hottest ones now.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvflow.router.blocks import OverlapIndex
from kvflow.router.cost import RoutingDecision

MAX_DECISIONS = 32
MAX_PREFIXES = 512
PREVIEW_TOKENS = 48


@dataclass(frozen=True)
class DecisionRecord:
    """One routing decision as the fleet view shows it."""

    at: float  # wall-clock seconds
    request_id: str
    decision: RoutingDecision


@dataclass
class PrefixHeat:
    """One shared prefix: its blocks (the chain of hashes), a token preview and its hits."""

    hashes: list[int]
    preview: list[int]
    hits: int = 0
    last: float = 0.0


@dataclass(frozen=True)
class HotPrefix:
    blocks: int
    hits: int
    preview: list[int]
    holders: list[int] = field(default_factory=list)


class RouterObserver:
    """Bounded memory of one router's recent behaviour (see the module docstring)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.decisions: deque[DecisionRecord] = deque(maxlen=MAX_DECISIONS)
        self._prefixes: dict[int, PrefixHeat] = {}
        # Output tokens streamed from each worker (added when each stream ends).
        self.tokens: dict[int, int] = {}

    def on_decision(self, request_id: str, token_ids: Sequence[int], block_hashes: Sequence[int],
                    decision: RoutingDecision) -> None:
        now = time.time()
        self.decisions.append(DecisionRecord(now, request_id, decision))
        depth = min(int(max(decision.overlaps.values(), default=0)), len(block_hashes))
        if depth <= 0:
            return
        key = block_hashes[depth - 1]
        heat = self._prefixes.get(key)
        if heat is None:
            if len(self._prefixes) >= MAX_PREFIXES:
                self._forget_cold()
            heat = self._prefixes[key] = PrefixHeat(
                list(block_hashes[:depth]), list(token_ids[:min(depth * self.block_size,
                                                                PREVIEW_TOKENS)]))
        heat.hits += 1
        heat.last = now

    def on_stream_end(self, worker_id: int, tokens: int) -> None:
        if tokens:
            self.tokens[worker_id] = self.tokens.get(worker_id, 0) + tokens

    def on_worker_removed(self, worker_id: int) -> None:
        self.tokens.pop(worker_id, None)

    def hot_prefixes(self, index: OverlapIndex, limit: int = 5) -> list[HotPrefix]:
        """The most reused prefixes, each with the workers that hold all of it now."""
        hottest = sorted(self._prefixes.values(), key=lambda h: (h.hits, h.last), reverse=True)
        out = []
        for heat in hottest[:limit]:
            scores = index.find_matches(heat.hashes).scores
            holders = sorted(w for w, depth in scores.items() if depth >= len(heat.hashes))
            out.append(HotPrefix(len(heat.hashes), heat.hits, heat.preview, holders))
        return out

    def _forget_cold(self) -> None:
        """Drop the colder half of the prefix table."""
        ranked = sorted(self._prefixes.items(), key=lambda kv: (kv[1].hits, kv[1].last))
        for key, _ in ranked[: len(ranked) // 2]:
            del self._prefixes[key]


@dataclass(frozen=True)
class WorkerView:
    """One worker as its router sees it: KV by tier, queue and what was routed there."""

    worker_id: int
    gpu_blocks_used: int
    gpu_blocks_total: int
    host_blocks_used: int
    host_blocks_total: int
    index_blocks: int  # blocks of this worker the router's index knows
    running: int
    waiting: int
    routed_active: int  # requests this router has in flight there
    tokens_total: int  # output tokens streamed from it so far


@dataclass(frozen=True)
class RouterView:
    """A fleet snapshot of one router: workers, last decisions, hottest shared prefixes."""

    policy: str
    block_size: int
    workers: list[WorkerView]
    decisions: list[DecisionRecord]
    prefixes: list[HotPrefix]

