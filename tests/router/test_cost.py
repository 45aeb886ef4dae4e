"""Cost formula and worker selection: hand-computed cases and sampling sanity."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kvflow.router.cost import (
    kv_costs,
    load_cost,
    predicted_hit_rate,
    prefill_blocks,
    select_worker,
    softmax_probabilities,
    worker_cost,
)
from kvflow.router.load import WorkerLoad


def test_prefill_blocks_subtracts_cached_prefix() -> None:
    assert prefill_blocks(64, 0, 16) == 4.0
    assert prefill_blocks(64, 3, 16) == 1.0
    assert prefill_blocks(70, 4, 16) == pytest.approx(6 / 16)
    assert prefill_blocks(64, 10, 16) == 0.0


def test_worker_cost_hand_computed() -> None:
    # 128 tokens = 8 blocks, 5 cached -> 3 new; 32 queued prefill tokens -> 2 blocks;
    # 10 decode blocks. scale 2: 2 * (3 + 2) + 10 = 20.
    load = WorkerLoad(worker_id=1, prefill_tokens=32, decode_blocks=10)
    assert worker_cost(128, 5, load, 16, 2.0) == 20.0
    assert load_cost(load, 16, 2.0) == 2 * 2 + 10


def test_kv_costs_prefers_overlap_until_load_outweighs_it() -> None:
    loads = {1: WorkerLoad(1, decode_blocks=0), 2: WorkerLoad(2, decode_blocks=3)}
    # Worker 2 caches 6 of 8 blocks: cost 2 + 3 = 5; worker 1: 8 + 0 = 8.
    assert kv_costs(128, {2: 6}, loads, 16, 1.0) == {1: 8.0, 2: 5.0}
    loads[2] = WorkerLoad(2, decode_blocks=7)
    # Now worker 2 costs 2 + 7 = 9 > 8.
    assert kv_costs(128, {2: 6}, loads, 16, 1.0) == {1: 8.0, 2: 9.0}


def test_select_minimum() -> None:
    rng = random.Random(0)
    assert select_worker({1: 5.0, 2: 3.0, 3: 4.0}, 0.0, rng) == 2


def test_select_breaks_ties_at_random() -> None:
    rng = random.Random(1)
    picks = Counter(select_worker({1: 2.0, 2: 2.0, 3: 9.0}, 0.0, rng) for _ in range(400))
    assert set(picks) == {1, 2}
    assert 120 < picks[1] < 280


def test_select_needs_candidates() -> None:
    with pytest.raises(ValueError, match="at least one"):
        select_worker({}, 0.0, random.Random(0))


def test_softmax_probabilities_hand_computed() -> None:
    # Normalized costs 0, 0.5, 1 at temperature 1 -> weights 1, e^-0.5, e^-1.
    probs = softmax_probabilities({1: 10.0, 2: 15.0, 3: 20.0}, 1.0)
    import math

    total = 1 + math.exp(-0.5) + math.exp(-1)
    assert probs[1] == pytest.approx(1 / total)
    assert probs[2] == pytest.approx(math.exp(-0.5) / total)
    assert probs[3] == pytest.approx(math.exp(-1) / total)
    assert softmax_probabilities({1: 4.0, 2: 4.0}, 0.5) == {1: 0.5, 2: 0.5}


def test_temperature_sampling_matches_softmax() -> None:
    costs = {1: 0.0, 2: 50.0, 3: 100.0}
    rng = random.Random(42)
    n = 20_000
    picks = Counter(select_worker(costs, 0.5, rng) for _ in range(n))
    for worker, p in softmax_probabilities(costs, 0.5).items():
        assert abs(picks[worker] / n - p) < 0.015


def test_low_temperature_concentrates_on_cheapest() -> None:
    rng = random.Random(3)
    picks = Counter(select_worker({1: 0.0, 2: 1.0}, 0.05, rng) for _ in range(1000))
    assert picks[1] > 990


def test_sampling_is_reproducible_with_seed() -> None:
    costs = {w: float(w) for w in range(8)}
    a = [select_worker(costs, 1.0, random.Random(7)) for _ in range(3)]
    r1, r2 = random.Random(11), random.Random(11)
    assert [select_worker(costs, 1.0, r1) for _ in range(50)] == [
        select_worker(costs, 1.0, r2) for _ in range(50)
    ]
    assert len(set(a)) == 1


def test_predicted_hit_rate() -> None:
    assert predicted_hit_rate(3, 64, 16) == 0.75
    assert predicted_hit_rate(0, 64, 16) == 0.0
    assert predicted_hit_rate(4, 70, 16) == pytest.approx(64 / 70)
    assert predicted_hit_rate(0, 0, 16) == 0.0
