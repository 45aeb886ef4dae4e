"""Gap recovery: snapshot fetch, buffering of newer events, retries and removal."""

from __future__ import annotations

import asyncio

from kvflow.llm.kv_events import (
    BlocksRemoved,
    BlocksStored,
    CachedBlock,
    CacheSnapshot,
    KvEvent,
    StoredBlock,
)
from kvflow.router.indexer import KvIndex
from kvflow.router.recovery import GapRecovery


def stored(*hashes: int) -> BlocksStored:
    return BlocksStored([StoredBlock(h, []) for h in hashes])


def snapshot(worker: int, last_id: int, *hashes: int) -> CacheSnapshot:
    parents = (None, *hashes)[: len(hashes)]
    return CacheSnapshot(worker, last_id, [CachedBlock(h, p) for h, p in zip(hashes, parents, strict=True)])


class FakeWorker:
    """Answers snapshot requests once released, after failing `failures` times."""

    def __init__(self, snap: CacheSnapshot, failures: int = 0) -> None:
        self.snap = snap
        self.failures = failures
        self.calls = 0
        self.release = asyncio.Event()

    async def fetch(self, worker_id: int) -> CacheSnapshot:
        self.calls += 1
        await self.release.wait()
        if self.calls <= self.failures:
            raise ConnectionError("worker unreachable")
        return self.snap


async def test_gap_fetches_snapshot_and_replays_newer_buffered_events() -> None:
    index = KvIndex()
    # The worker's true state at event 4: blocks 1, 2, 5.
    worker = FakeWorker(snapshot(1, 5, 1, 2, 5))
    recovery = GapRecovery(index, worker.fetch, backoff_s=0.001)
    recovery.handle([KvEvent(1, 1, stored(1, 2))])
    recovery.handle([KvEvent(1, 4, stored(9))])  # events 2 and 3 were lost
    assert recovery.recovering() == [1]
    # Events arriving during recovery are buffered, not applied.
    recovery.handle([KvEvent(1, 5, stored(5)), KvEvent(1, 6, stored(6)), KvEvent(1, 7,
                     BlocksRemoved([2]))])
    assert not index.holds(1, 6)
    worker.release.set()
    await recovery.wait_idle()
    assert recovery.recovering() == []
    assert index.last_event_id(1) == 7
    assert index.find_matches([1, 2]).scores == {1: 1}
    assert index.holds(1, 5) and index.holds(1, 6) and not index.holds(1, 9)
    stats = recovery.stats()
    assert (stats.gaps, stats.recovered, stats.failed, stats.buffered) == (1, 1, 0, 0)


async def test_other_workers_keep_flowing_during_recovery() -> None:
    index = KvIndex()
    worker = FakeWorker(snapshot(1, 11, 7))
    recovery = GapRecovery(index, worker.fetch)
    recovery.handle([KvEvent(1, 11, stored(7)), KvEvent(2, 1, stored(7))])
    assert index.find_matches([7]).scores == {2: 1}
    worker.release.set()
    await recovery.wait_idle()
    assert index.find_matches([7]).scores == {1: 1, 2: 1}


async def test_retries_then_succeeds() -> None:
    index = KvIndex()
    worker = FakeWorker(snapshot(1, 3, 3), failures=2)
    worker.release.set()
    recovery = GapRecovery(index, worker.fetch, attempts=3, backoff_s=0.001)
    recovery.handle([KvEvent(1, 3, stored(3))])
    await recovery.wait_idle()
    assert worker.calls == 3
    assert index.holds(1, 3) and index.last_event_id(1) == 3


async def test_gives_up_and_forgets_stale_state() -> None:
    index = KvIndex()
    worker = FakeWorker(snapshot(1, 1), failures=99)
    worker.release.set()
    recovery = GapRecovery(index, worker.fetch, attempts=2, backoff_s=0.001)
    recovery.handle([KvEvent(1, 1, stored(1, 2))])
    recovery.handle([KvEvent(1, 6, stored(3))])
    await recovery.wait_idle()
    assert recovery.stats().failed == 1
    assert index.find_matches([1]).scores == {}  # stale blocks no longer trusted
    # The next event starts a fresh recovery.
    worker.failures = 0
    worker.snap = snapshot(1, 7, 4)
    recovery.handle([KvEvent(1, 7, stored(4))])
    await recovery.wait_idle()
    assert index.holds(1, 4)


async def test_snapshot_older_than_buffer_triggers_another_round() -> None:
    index = KvIndex()
    worker = FakeWorker(snapshot(1, 3, 1))
    worker.release.set()
    recovery = GapRecovery(index, worker.fetch, backoff_s=0.001)
    recovery.handle([KvEvent(1, 6, stored(8))])  # snapshot stops at 3: 4 and 5 missing
    await asyncio.sleep(0)
    worker.snap = snapshot(1, 6, 1, 8)
    await recovery.wait_idle()
    assert worker.calls == 2
    assert index.last_event_id(1) == 6 and index.holds(1, 8)


async def test_removing_a_recovering_worker_cancels_recovery() -> None:
    index = KvIndex()
    worker = FakeWorker(snapshot(1, 4, 1))
    recovery = GapRecovery(index, worker.fetch)
    recovery.handle([KvEvent(1, 4, stored(1))])
    await asyncio.sleep(0)
    recovery.remove_worker(1)
    index.remove_worker(1)
    worker.release.set()
    await recovery.close()
    assert recovery.recovering() == [] and index.workers() == []


async def test_buffer_is_bounded() -> None:
    index = KvIndex()
    worker = FakeWorker(snapshot(1, 1))
    recovery = GapRecovery(index, worker.fetch, max_buffered=10)
    recovery.handle([KvEvent(1, i, stored(i)) for i in range(5, 100)])
    assert recovery.stats().buffered == 10
    await recovery.close()
