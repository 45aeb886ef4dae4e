"""The load-vs-recompute policy: what recomputing a prompt token costs, hand-computed."""

from __future__ import annotations

import pytest

from kvflow.kv.tiers.policy import LoadCostModel, PrefillRate


def test_steps_of_one_size_give_their_seconds_per_token() -> None:
    rate = PrefillRate(prior=1.0)
    for _ in range(5):
        rate.add(512, 0.0512)
    assert rate.value == pytest.approx(1e-4)


def test_small_steps_do_not_count_once_a_long_prefill_is_seen() -> None:
    """16-token steps (a prefix hit computes its last tokens) take 25 ms, mostly fixed cost;
    an 8192-token chunk 290 ms. The chunk's 35.4 us a token is the rate; the small steps'
    1.56 ms a token is dropped when the chunk arrives and ignored after it."""
    rate = PrefillRate(prior=1.0)
    for _ in range(10):
        rate.add(16, 0.025)
    assert rate.value == pytest.approx(0.025 / 16)
    rate.add(8192, 0.29)
    for _ in range(5):
        rate.add(16, 0.025)
    assert rate.value == pytest.approx(0.29 / 8192)
    rate.add(4096, 0.15)  # a quarter of the largest or more: counted (alpha 0.2)
    assert rate.value == pytest.approx(0.29 / 8192 + 0.2 * (0.15 / 4096 - 0.29 / 8192))


def test_a_step_that_waited_for_a_disk_load_does_not_make_recompute_look_free() -> None:
    """Few tokens and a long wait: it must neither drag the rate to zero (every host hit
    would then be declined) nor up (every slow disk hit would be loaded)."""
    rate = PrefillRate(prior=1.0)
    rate.add(8192, 0.29)
    rate.add(16, 1.4)
    rate.add(8192, 0.29)
    assert rate.value == pytest.approx(0.29 / 8192)


def test_a_disk_hit_slower_than_recompute_is_declined_and_a_host_hit_loaded() -> None:
    """The H200 case (8B shape, 2 MiB blocks): recomputing a block costs 16 x 35.4 us =
    0.57 ms; the disk reads a block in 1.3 ms, pinned host memory in 50 us."""
    costs = LoadCostModel(block_bytes=2 << 20, block_size=16)
    for n, s in [(16, 0.025)] * 8 + [(8192, 0.29), (16, 1.4)] + [(16, 0.025)] * 8:
        costs.observe_prefill(n, s)
    costs.observe_load("disk", 4, 4 * 1.3e-3)
    costs.observe_load("host", 4, 4 * 5e-5)
    assert costs.recompute_s(1) == pytest.approx(16 * 0.29 / 8192)
    assert not costs.worth_loading("disk", 1)
    assert costs.worth_loading("host", 1)
