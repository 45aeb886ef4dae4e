"""Pending blocks: a routed prompt's blocks, counted as cached on its worker until events say.

Between routing a prompt and its worker's KV events about it (after the prefill, so
tens of milliseconds to seconds later) the exact index does not know the worker will
hold those blocks, and the next request with the same prefix would be routed as if
nobody had it. The router books the blocks it expects as pending on the chosen worker;
matching extends each worker's exact overlap with its pending blocks. A `BlocksStored`
event confirms them (the index has them now: the pending entry goes), a `BlocksRemoved`
or `AllCleared` refutes them, and whatever neither confirms nor refutes expires after
`ttl_s`. Only blocks beyond the worker's known overlap are booked, so a hot prefix costs
nothing here once its blocks are confirmed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Mapping, Sequence

from kvflow.llm.kv_events import AllCleared, BlocksRemoved, BlocksStored, KvEvent


class PendingBlocks:
    """worker → {block hash: expiry}, with expiry in booking order."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        assert ttl_s > 0
        self._ttl_s = ttl_s
        self._clock = clock
        self._held: dict[int, dict[int, float]] = {}
        self._expiry: deque[tuple[float, int, Sequence[int]]] = deque()

    def book(self, worker_id: int, block_hashes: Sequence[int]) -> None:
        """The worker is about to compute these blocks (a prompt's tail, in order)."""
        if not block_hashes:
            return
        now = self._clock()
        self._expire(now)
        deadline = now + self._ttl_s
        held = self._held.setdefault(worker_id, {})
        for h in block_hashes:
            held[h] = deadline
        self._expiry.append((deadline, worker_id, block_hashes))

    def extend(self, block_hashes: Sequence[int], scores: Mapping[int, int],
               candidates: Container[int]) -> dict[int, int]:
        """Per candidate with pending blocks, how many more leading blocks past its score
        (`scores[w]`: leading blocks the exact index has) are pending there."""
        if not self._held:
            return {}
        self._expire(self._clock())
        extra: dict[int, int] = {}
        n = len(block_hashes)
        for w, held in self._held.items():
            if w not in candidates:
                continue
            start = i = scores.get(w, 0)
            while i < n and block_hashes[i] in held:
                i += 1
            if i > start:
                extra[w] = i - start
        return extra

    def confirm(self, worker_id: int, block_hashes: Iterable[int]) -> None:
        """Events stored these blocks (or removed them): they are no longer pending."""
        held = self._held.get(worker_id)
        if held:
            for h in block_hashes:
                held.pop(h, None)

    refute = confirm

    def apply(self, events: Iterable[KvEvent]) -> None:
        """Settle pending blocks from a worker's KV events."""
        for event in events:
            data = event.data
            if isinstance(data, BlocksStored):
                self.confirm(event.worker_id, [b.block_hash for b in data.blocks])
            elif isinstance(data, BlocksRemoved):
                self.refute(event.worker_id, data.block_hashes)
            elif isinstance(data, AllCleared):
                self.clear_worker(event.worker_id)

    def clear_worker(self, worker_id: int) -> None:
        self._held.pop(worker_id, None)

    def num_blocks(self) -> int:
        self._expire(self._clock())
        return sum(len(held) for held in self._held.values())

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            deadline, worker, hashes = expiry.popleft()
            held = self._held.get(worker)
            if held is None:
                continue
            for h in hashes:
                if held.get(h) == deadline:  # not booked again since
                    del held[h]
            if not held:
                del self._held[worker]
