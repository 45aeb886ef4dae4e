"""Gap recovery: feed events to the index; when a worker's ids skip, fetch its snapshot.

While a worker recovers, its newer events are buffered; once the snapshot arrives it is
applied, then the buffered events newer than the snapshot. A fetch that keeps failing
drops the worker's (stale) blocks and history, so its next event starts over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from kvflow.llm.kv_events import CacheSnapshot, KvEvent
from kvflow.router.indexer import ApplyStatus, KvIndex

log = logging.getLogger(__name__)

FetchSnapshot = Callable[[int], Awaitable[CacheSnapshot]]


@dataclass(frozen=True)
class RecoveryStats:
    gaps: int
    recovered: int
    failed: int
    buffered: int


class GapRecovery:
    """Owns the flow of KV events into a `KvIndex`, recovering workers that miss events."""

    def __init__(
        self,
        index: KvIndex,
        fetch_snapshot: FetchSnapshot,
        *,
        attempts: int = 5,
        backoff_s: float = 0.1,
        max_buffered: int = 10_000,
    ) -> None:
        self._index = index
        self._fetch = fetch_snapshot
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._max_buffered = max_buffered
        self._buffers: dict[int, list[KvEvent]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._gaps = self._recovered = self._failed = 0

    # --- feeding -------------------------------------------------------------------
    def handle(self, events: Iterable[KvEvent]) -> None:
        """Apply events in order; start recovery for any worker whose ids skip."""
        for event in events:
            self._handle_one(event)

    def _handle_one(self, event: KvEvent) -> None:
        worker = event.worker_id
        if worker in self._buffers:
            self._buffer(event)
            return
        result = self._index.apply(event)
        if result.status is ApplyStatus.GAP:
            log.warning(
                "kv events of worker %d skipped from %d to %d; fetching its snapshot",
                worker, result.expected_event_id, result.event_id,
            )
            self._gaps += 1
            self._buffers[worker] = [event]
            self._tasks[worker] = asyncio.get_running_loop().create_task(self._recover(worker))

    def _buffer(self, event: KvEvent) -> None:
        buf = self._buffers[event.worker_id]
        buf.append(event)
        if len(buf) > self._max_buffered:
            del buf[0]  # a later gap check after the snapshot catches what this loses

    # --- recovering ----------------------------------------------------------------
    async def _recover(self, worker: int) -> None:
        me = asyncio.current_task()
        try:
            snapshot = await self._fetch_with_retries(worker)
        finally:
            if self._tasks.get(worker) is me:
                del self._tasks[worker]
        buffered = self._buffers.pop(worker, [])
        if snapshot is None:
            self._failed += 1
            self._index.forget_history(worker)
            return
        self._recovered += 1
        self._index.apply_snapshot(snapshot)
        buffered.sort(key=lambda e: e.event_id)
        self.handle(e for e in buffered if e.event_id > snapshot.last_event_id)

    async def _fetch_with_retries(self, worker: int) -> CacheSnapshot | None:
        delay = self._backoff_s
        for attempt in range(1, self._attempts + 1):
            try:
                snapshot = await self._fetch(worker)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("snapshot of worker %d failed (attempt %d/%d): %s",
                            worker, attempt, self._attempts, exc)
            else:
                if snapshot.worker_id == worker:
                    return snapshot
                log.warning("asked worker %d for its snapshot, got worker %d's",
                            worker, snapshot.worker_id)
            if attempt < self._attempts:
                await asyncio.sleep(delay)
                delay *= 2
        log.error("giving up on worker %d's snapshot after %d attempts; its cached blocks "
                  "are ignored until its next KV event", worker, self._attempts)
        return None

    # --- lifecycle -----------------------------------------------------------------
    def remove_worker(self, worker_id: int) -> None:
        """Stop recovering a worker that left and drop its buffered events."""
        task = self._tasks.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self._buffers.pop(worker_id, None)

    def recovering(self) -> list[int]:
        return list(self._buffers)

    async def wait_idle(self) -> None:
        """Wait until no worker is recovering (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for worker in list(self._tasks):
            self.remove_worker(worker)
        await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> RecoveryStats:
        buffered = sum(len(b) for b in self._buffers.values())
        return RecoveryStats(self._gaps, self._recovered, self._failed, buffered)
