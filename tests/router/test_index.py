"""KvIndex against a brute-force oracle on random event streams, plus gaps and removal."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from kvflow.llm.kv_events import (
    AllCleared,
    BlocksRemoved,
    BlocksStored,
    CachedBlock,
    CacheSnapshot,
    KvEvent,
    KvEventData,
    StoredBlock,
)
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.router.indexer import ApplyStatus, KvIndex

BLOCK = 4


class Oracle:
    """The obvious model: per worker a set of hashes; match = leading run per worker."""

    def __init__(self) -> None:
        self.held: dict[int, set[int]] = {}

    def apply(self, worker: int, data: KvEventData) -> None:
        held = self.held.setdefault(worker, set())
        if isinstance(data, BlocksStored):
            held.update(b.block_hash for b in data.blocks)
        elif isinstance(data, BlocksRemoved):
            held.difference_update(data.block_hashes)
        else:
            held.clear()

    def find_matches(self, hashes: Sequence[int]) -> dict[int, int]:
        scores = {}
        for worker, held in self.held.items():
            n = 0
            while n < len(hashes) and hashes[n] in held:
                n += 1
            if n:
                scores[worker] = n
        return scores

    def num_blocks(self) -> int:
        return len(set().union(*self.held.values())) if self.held else 0


def stored(hashes: Sequence[int], parent: int | None = None) -> BlocksStored:
    return BlocksStored([StoredBlock(h, []) for h in hashes], parent_hash=parent)


def make_prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Prompts that share prefixes (a few system prompts, then divergent user text)."""
    systems = [[rng.randrange(1000) for _ in range(BLOCK * rng.randint(1, 6))] for _ in range(4)]
    return [
        rng.choice(systems) + [rng.randrange(1000) for _ in range(BLOCK * rng.randint(0, 8))]
        for _ in range(n)
    ]


def random_event(rng: random.Random, oracle: Oracle, worker: int, chains: list[list[int]]) -> (
    KvEventData
):
    roll = rng.random()
    held = sorted(oracle.held.get(worker, ()))
    if roll < 0.6:
        chain = rng.choice(chains)
        start = rng.randrange(len(chain))
        end = rng.randint(start + 1, len(chain))
        return stored(chain[start:end], chain[start - 1] if start else None)
    if roll < 0.95 and held:
        picked = rng.sample(held, rng.randint(1, min(len(held), 6)))
        return BlocksRemoved([*picked, rng.getrandbits(64)])  # plus one never stored
    return AllCleared()


@pytest.mark.parametrize("seed", range(6))
def test_index_matches_oracle_on_random_streams(seed: int) -> None:
    rng = random.Random(seed)
    chains = [sequence_hashes(p, BLOCK) for p in make_prompts(rng, 30)]
    chains = [c for c in chains if c]
    workers = list(range(100, 100 + rng.randint(3, 40)))
    index, oracle = KvIndex(), Oracle()
    next_id = dict.fromkeys(workers, 1)
    for step in range(1500):
        worker = rng.choice(workers)
        if rng.random() < 0.02:  # the worker leaves; it may come back with a fresh history
            index.remove_worker(worker)
            oracle.held.pop(worker, None)
            next_id[worker] = 1
            continue
        data = random_event(rng, oracle, worker, chains)
        result = index.apply(KvEvent(worker, next_id[worker], data))
        assert result.status is ApplyStatus.APPLIED
        next_id[worker] += 1
        oracle.apply(worker, data)
        if step % 10 == 0:
            query = rng.choice(chains)
            query = query[: rng.randint(1, len(query))]
            assert index.find_matches(query).scores == oracle.find_matches(query)
    assert index.num_blocks() == oracle.num_blocks()
    for chain in chains:
        assert index.find_matches(chain).scores == oracle.find_matches(chain)


def test_match_requires_the_whole_prefix() -> None:
    index = KvIndex()
    h = [11, 12, 13, 14]
    index.apply(KvEvent(1, 1, stored(h)))
    index.apply(KvEvent(2, 1, stored([11, 13, 14])))  # holds 13 and 14 but not 12
    index.apply(KvEvent(3, 1, stored([12, 13])))  # no first block at all
    result = index.find_matches(h)
    assert result.scores == {1: 4, 2: 1}
    assert result.frequencies == [2, 1, 1, 1]
    assert index.find_matches([99, 11]).scores == {}
    assert index.find_matches([]).scores == {}


def test_frequencies_count_workers_per_depth() -> None:
    index = KvIndex()
    for worker, n in [(1, 3), (2, 2), (3, 1)]:
        index.apply(KvEvent(worker, 1, stored([5, 6, 7][:n])))
    assert index.find_matches([5, 6, 7, 8]).frequencies == [3, 2, 1]


def test_all_cleared_and_removed() -> None:
    index = KvIndex()
    index.apply(KvEvent(1, 1, stored([1, 2, 3])))
    index.apply(KvEvent(2, 1, stored([1, 2])))
    index.apply(KvEvent(1, 2, BlocksRemoved([3])))
    assert index.find_matches([1, 2, 3]).scores == {1: 2, 2: 2}
    index.apply(KvEvent(1, 3, AllCleared()))
    assert index.find_matches([1, 2, 3]).scores == {2: 2}
    assert index.num_blocks() == 2
    assert index.num_worker_blocks(1) == 0


def test_remove_worker_drops_its_blocks_and_frees_its_slot() -> None:
    index = KvIndex()
    index.apply(KvEvent(1, 1, stored([1, 2])))
    index.apply(KvEvent(2, 1, stored([1, 2, 3])))
    index.remove_worker(2)
    assert index.workers() == [1]
    assert index.num_blocks() == 2
    assert index.find_matches([1, 2, 3]).scores == {1: 2}
    # A new worker reuses the freed bit and must not inherit worker 2's blocks.
    index.apply(KvEvent(3, 1, stored([9])))
    assert index.find_matches([1, 2, 3]).scores == {1: 2}
    assert index.find_matches([9]).scores == {3: 1}
    # Worker 2 coming back starts with a fresh history.
    assert index.apply(KvEvent(2, 1, stored([1]))).status is ApplyStatus.APPLIED


def test_gap_and_stale_detection() -> None:
    index = KvIndex()
    assert index.apply(KvEvent(1, 1, stored([1]))).status is ApplyStatus.APPLIED
    assert index.apply(KvEvent(1, 1, stored([2]))).status is ApplyStatus.STALE
    gap = index.apply(KvEvent(1, 4, stored([3])))
    assert gap.needs_recovery and gap.expected_event_id == 2
    assert not index.holds(1, 3)  # not applied across the gap
    assert index.last_event_id(1) == 1


def test_restart_under_the_same_id_resets_the_worker() -> None:
    index = KvIndex()
    for i in range(1, 4):
        index.apply(KvEvent(1, i, stored([i])))
    result = index.apply(KvEvent(1, 1, stored([9])))  # event ids start over
    assert result.status is ApplyStatus.APPLIED
    assert not index.holds(1, 1) and index.holds(1, 9)
    assert index.apply(KvEvent(1, 2, stored([10]))).status is ApplyStatus.APPLIED


def test_late_joiner_needs_recovery() -> None:
    # Engines number events from 1: a worker first seen at 43 had events before we joined.
    assert KvIndex().apply(KvEvent(7, 43, stored([1]))).needs_recovery
    assert KvIndex().apply(KvEvent(7, 1, stored([1]))).status is ApplyStatus.APPLIED
    assert KvIndex(first_event_id=0).apply(KvEvent(7, 0, stored([1]))).status is (
        ApplyStatus.APPLIED
    )


def test_snapshot_replaces_worker_state() -> None:
    index = KvIndex()
    index.apply(KvEvent(1, 1, stored([1, 2, 3])))
    snap = CacheSnapshot(1, 11, [CachedBlock(1, None), CachedBlock(4, 1)])
    index.apply_snapshot(snap)
    assert index.find_matches([1, 2]).scores == {1: 1}
    assert index.find_matches([1, 4]).scores == {1: 2}
    assert index.apply(KvEvent(1, 11, stored([5]))).status is ApplyStatus.STALE
    assert index.apply(KvEvent(1, 12, stored([5]))).status is ApplyStatus.APPLIED


def test_memory_follows_cached_blocks() -> None:
    index = KvIndex()
    for worker in range(50):
        index.apply(KvEvent(worker, 1, stored(range(1000))))
    assert index.num_blocks() == 1000
    for worker in range(50):
        index.apply(KvEvent(worker, 2, BlocksRemoved(list(range(1000)))))
    assert index.num_blocks() == 0
