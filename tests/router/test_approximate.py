"""Approximate mode: routed prompts count as cached for a TTL, bounded LRU."""

from __future__ import annotations

from kvflow.router.approximate import ApproxIndex


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_routed_blocks_match_until_ttl() -> None:
    clock = Clock()
    index = ApproxIndex(ttl_s=10.0, clock=clock)
    index.record(1, [1, 2, 3])
    assert index.find_matches([1, 2, 3, 4]).scores == {1: 3}
    clock.now += 9.9
    assert index.find_matches([1, 2]).scores == {1: 2}
    clock.now += 0.2
    assert index.find_matches([1, 2]).scores == {}
    assert index.num_blocks() == 0 and index.num_entries() == 0


def test_routing_again_refreshes_the_ttl() -> None:
    clock = Clock()
    index = ApproxIndex(ttl_s=10.0, clock=clock)
    index.record(1, [1, 2, 3])
    clock.now += 6
    index.record(1, [1, 2])  # same prefix routed again
    index.record(2, [1])
    clock.now += 6  # block 3 (12 s old) expired; 1 and 2 (6 s) live
    assert index.find_matches([1, 2, 3]).scores == {1: 2, 2: 1}


def test_lru_bound_evicts_least_recently_routed() -> None:
    index = ApproxIndex(ttl_s=100.0, max_blocks=4, clock=Clock())
    index.record(1, [1, 2])
    index.record(2, [1, 2])
    index.record(1, [1])  # refresh (1, 1): (1, 2) is now the oldest
    index.record(3, [7])
    assert index.num_entries() == 4
    assert index.find_matches([1, 2]).scores == {1: 1, 2: 2}
    assert index.find_matches([7]).scores == {3: 1}


def test_remove_worker() -> None:
    index = ApproxIndex(ttl_s=100.0, clock=Clock())
    index.record(1, [1, 2])
    index.record(2, [1, 2])
    index.remove_worker(1)
    assert index.find_matches([1, 2]).scores == {2: 2}
    assert index.num_entries() == 2 and index.workers() == [2]
