"""BlockPool: allocation, prefix matching, commit/dedupe, LRU eviction, events, snapshots."""

from __future__ import annotations

import pytest

from kvflow.engines.core.block_pool import BlockPool
from kvflow.llm.kv_events import AllCleared, BlocksRemoved, BlocksStored
from kvflow.llm.kv_hash import sequence_hashes

BS = 4


def commit_chain(pool: BlockPool, blocks: list[int], tokens: list[int]) -> list[int]:
    """Commit `blocks` as the full blocks of `tokens`; returns the ids to keep."""
    hashes = sequence_hashes(tokens, BS)
    kept = []
    for i, (block, h) in enumerate(zip(blocks, hashes, strict=False)):
        parent = hashes[i - 1] if i else None
        kept.append(pool.commit(block, h, parent, tokens[i * BS : (i + 1) * BS]))
    return kept


def test_allocate_free_check_act() -> None:
    pool = BlockPool(4, BS)
    assert pool.can_allocate(4) and not pool.can_allocate(5)
    blocks = pool.allocate(3)
    assert sorted(blocks) == [0, 1, 2] and pool.num_free_blocks == 1
    assert pool.num_active_blocks == 3
    pool.free(blocks)
    assert pool.num_free_blocks == 4 and pool.num_active_blocks == 0
    assert pool.drain_events() == []  # uncommitted blocks never show up as events
    pool.check_invariants()


def test_commit_match_and_lru_eviction_tail_first() -> None:
    pool = BlockPool(3, BS)
    tokens = list(range(12))
    blocks = commit_chain(pool, pool.allocate(3), tokens)
    stored = pool.drain_events()
    assert len(stored) == 1 and isinstance(stored[0].data, BlocksStored)
    assert [b.block_hash for b in stored[0].data.blocks] == sequence_hashes(tokens, BS)
    pool.free(blocks)
    assert pool.num_cached_blocks == 3 and pool.num_free_blocks == 3

    hashes = sequence_hashes(tokens, BS)
    hit = pool.match_prefix(hashes[:2])
    assert hit == blocks[:2] and pool.num_active_blocks == 2
    pool.free(hit)  # the two prefix blocks become the most recently used
    evicted = pool.allocate(1)
    assert evicted == [blocks[2]]  # the deepest block went first
    removed = pool.drain_events()
    assert [e.data for e in removed] == [BlocksRemoved([hashes[2]])]
    assert pool.match_prefix(hashes) == blocks[:2]  # prefix still matchable, tail gone
    pool.check_invariants()


def test_commit_dedupes_onto_cached_twin() -> None:
    pool = BlockPool(4, BS)
    tokens = [7, 7, 7, 7]
    (first,) = commit_chain(pool, pool.allocate(1), tokens)
    pool.drain_events()
    copy = pool.allocate(1)[0]
    kept = commit_chain(pool, [copy], tokens)
    assert kept == [first] and pool.drain_events() == []
    assert pool.num_active_blocks == 1 and pool.num_free_blocks == 3  # the copy is free again
    pool.free([first, *kept])
    assert pool.num_active_blocks == 0
    pool.check_invariants()


def test_events_coalesce_and_ids_increase() -> None:
    pool = BlockPool(8, BS, worker_id=5)
    a = commit_chain(pool, pool.allocate(2), list(range(8)))
    b = commit_chain(pool, pool.allocate(2), list(range(100, 108)))
    events = pool.drain_events()
    assert [len(e.data.blocks) for e in events] == [2, 2]  # one event per chain
    assert [e.event_id for e in events] == [1, 2] and {e.worker_id for e in events} == {5}
    pool.free(a + b)
    pool.allocate(8)  # evicts all four cached blocks in one step
    (removed,) = pool.drain_events()
    assert removed.event_id == 3 and len(removed.data.block_hashes) == 4


def test_snapshot_follows_drained_events_only() -> None:
    pool = BlockPool(8, BS)
    tokens = list(range(16))
    blocks = commit_chain(pool, pool.allocate(4), tokens)
    assert pool.snapshot().blocks == [] and pool.snapshot().last_event_id == 0
    pool.drain_events()
    snap = pool.snapshot()
    hashes = sequence_hashes(tokens, BS)
    assert [b.block_hash for b in snap.blocks] == hashes
    assert [b.parent_hash for b in snap.blocks] == [None, *hashes[:-1]]
    assert snap.last_event_id == 1
    pool.free(blocks)


def test_clear_forgets_hashes_but_keeps_blocks_in_use() -> None:
    pool = BlockPool(4, BS)
    held = commit_chain(pool, pool.allocate(2), list(range(8)))
    other = commit_chain(pool, pool.allocate(1), [9, 9, 9, 9])
    pool.free(other)
    pool.drain_events()
    pool.clear()
    assert isinstance(pool.drain_events()[0].data, AllCleared)
    assert pool.num_cached_blocks == 0 and pool.snapshot().blocks == []
    assert pool.match_prefix(sequence_hashes(list(range(8)), BS)) == []
    pool.free(held)
    assert pool.num_free_blocks == 4
    pool.check_invariants()


def test_prefix_caching_disabled() -> None:
    pool = BlockPool(2, BS, enable_prefix_caching=False)
    blocks = pool.allocate(1)
    assert commit_chain(pool, blocks, [1, 2, 3, 4]) == blocks
    pool.free(blocks)
    assert pool.match_prefix(sequence_hashes([1, 2, 3, 4], BS)) == []
    assert pool.drain_events() == [] and pool.num_free_blocks == 2


def test_double_free_is_caught() -> None:
    pool = BlockPool(2, BS)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(AssertionError):
        pool.free(blocks)


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, BS)
