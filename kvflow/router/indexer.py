"""The exact KV index: follows each worker's KV events and spots gaps in their ids."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from kvflow.llm.kv_events import (
    AllCleared,
    BlocksRemoved,
    BlocksStored,
    CacheSnapshot,
    KvEvent,
)
from kvflow.router.blocks import BlockTable, OverlapScores
from kvflow.router.tiers import TierResidency


class ApplyStatus(enum.Enum):
    APPLIED = "applied"
    # The event id is not newer than the last one applied: a duplicate, ignored.
    STALE = "stale"
    # Events were missed before this one: not applied; the worker needs a snapshot.
    GAP = "gap"


@dataclass(frozen=True)
class ApplyResult:
    status: ApplyStatus
    worker_id: int
    event_id: int
    # The id the index expected next from this worker.
    expected_event_id: int

    @property
    def needs_recovery(self) -> bool:
        return self.status is ApplyStatus.GAP


class KvIndex:
    """Which worker caches which block, kept current from KV events and snapshots.

    Events of one worker must carry consecutive ids. An event after a gap is not
    applied (the result says GAP) until the worker's snapshot is applied; events not
    newer than the last applied one are ignored (STALE), except a worker's very first
    event id arriving late in its history: the worker restarted, so its blocks reset.
    """

    def __init__(self, first_event_id: int = 1) -> None:
        self._table = BlockTable()
        self.tiers = TierResidency()  # blocks below the device (host, disk, object store)
        self._last_id: dict[int, int] = {}
        self._first_event_id = first_event_id

    def apply(self, event: KvEvent) -> ApplyResult:
        worker = event.worker_id
        expected = self._last_id.get(worker, self._first_event_id - 1) + 1
        if event.event_id < expected:
            if not self._is_restart(event.event_id, expected):
                return ApplyResult(ApplyStatus.STALE, worker, event.event_id, expected)
            self._table.clear_worker(worker)
        if event.event_id > expected:
            return ApplyResult(ApplyStatus.GAP, worker, event.event_id, expected)
        self._apply_data(worker, event)
        self._last_id[worker] = event.event_id
        return ApplyResult(ApplyStatus.APPLIED, worker, event.event_id, expected)

    def _is_restart(self, event_id: int, expected: int) -> bool:
        """A first event id after several others: the worker restarted under the same id."""
        return event_id == self._first_event_id and expected > self._first_event_id + 1

    def _apply_data(self, worker: int, event: KvEvent) -> None:
        data = event.data
        if not isinstance(data, AllCleared) and data.medium not in (None, "device"):
            self.tiers.apply(worker, data)
        elif isinstance(data, BlocksStored):
            self._table.store(worker, [b.block_hash for b in data.blocks])
        elif isinstance(data, BlocksRemoved):
            self._table.remove(worker, data.block_hashes)
        else:
            assert isinstance(data, AllCleared), f"unknown KV event data {data!r}"
            self._table.add_worker(worker)
            self._table.clear_worker(worker)

    def apply_snapshot(self, snapshot: CacheSnapshot) -> None:
        """Replace everything known about the worker with the snapshot's state."""
        worker = snapshot.worker_id
        self._table.add_worker(worker)
        self._table.clear_worker(worker)
        self._table.store(worker, [b.block_hash for b in snapshot.blocks])
        self._last_id[worker] = snapshot.last_event_id

    def add_worker(self, worker_id: int) -> None:
        """Make the worker known (with no blocks) before any of its events arrive."""
        self._table.add_worker(worker_id)

    def remove_worker(self, worker_id: int) -> None:
        """Forget the worker's blocks and event history."""
        self._table.remove_worker(worker_id)
        self.tiers.remove_worker(worker_id)
        self._last_id.pop(worker_id, None)

    def forget_history(self, worker_id: int) -> None:
        """Drop the worker's blocks and event position; its next event triggers recovery."""
        self._table.clear_worker(worker_id)
        self._last_id.pop(worker_id, None)

    def last_event_id(self, worker_id: int) -> int | None:
        return self._last_id.get(worker_id)

    def find_matches(self, block_hashes: Sequence[int]) -> OverlapScores:
        return self._table.find_matches(block_hashes)

    def holds(self, worker_id: int, block_hash: int) -> bool:
        return self._table.holds(worker_id, block_hash)

    def workers(self) -> list[int]:
        return self._table.workers()

    def num_blocks(self) -> int:
        return self._table.num_blocks()

    def num_worker_blocks(self, worker_id: int) -> int:
        return self._table.num_worker_blocks(worker_id)
