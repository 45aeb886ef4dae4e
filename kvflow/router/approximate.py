"""Approximate mode: with no KV events, assume a routed prompt's blocks stay cached a while.

Each (worker, block) the router sent a prompt to is remembered for `ttl_s` after it was
last routed, and at most `max_blocks` such entries are kept (least recently routed go
first). Matching uses the same `BlockTable` as the exact index.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvflow.router.blocks import BlockTable, OverlapScores


class ApproxIndex:
    """An `OverlapIndex` fed by the router's own decisions instead of KV events."""

    def __init__(
        self,
        ttl_s: float = 120.0,
        max_blocks: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert ttl_s > 0 and max_blocks > 0
        self._ttl_s = ttl_s
        self._max_blocks = max_blocks
        self._clock = clock
        self._table = BlockTable()
        # (worker, hash) → expiry time, oldest first (one TTL, so touch order = expiry order).
        self._expiry: OrderedDict[tuple[int, int], float] = OrderedDict()

    def record(self, worker_id: int, block_hashes: Sequence[int]) -> None:
        """The prompt with these sequence hashes was routed to `worker_id`."""
        now = self._clock()
        self._expire(now)
        expiry = self._expiry
        deadline = now + self._ttl_s
        for h in block_hashes:
            key = (worker_id, h)
            if key in expiry:
                expiry.move_to_end(key)
            expiry[key] = deadline
        self._table.store(worker_id, block_hashes)
        self._evict_over_capacity()

    def find_matches(self, block_hashes: Sequence[int]) -> OverlapScores:
        self._expire(self._clock())
        return self._table.find_matches(block_hashes)

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry:
            deadline = next(iter(expiry.values()))
            if deadline > now:
                return
            self._drop_oldest()

    def _evict_over_capacity(self) -> None:
        while len(self._expiry) > self._max_blocks:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        (worker, h), _ = self._expiry.popitem(last=False)
        self._table.remove(worker, (h,))

    def add_worker(self, worker_id: int) -> None:
        self._table.add_worker(worker_id)

    def remove_worker(self, worker_id: int) -> None:
        for h in self._table.hashes_of(worker_id):
            del self._expiry[(worker_id, h)]
        self._table.remove_worker(worker_id)

    def workers(self) -> list[int]:
        return self._table.workers()

    def num_worker_blocks(self, worker_id: int) -> int:
        return self._table.num_worker_blocks(worker_id)

    def num_blocks(self) -> int:
        self._expire(self._clock())
        return self._table.num_blocks()

    def num_entries(self) -> int:
        """(worker, block) pairs remembered; bounded by `max_blocks`."""
        return len(self._expiry)
