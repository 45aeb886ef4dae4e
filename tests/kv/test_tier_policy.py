"""The load-vs-recompute policy: the marginal cost of a prefill token, hand-computed."""

from __future__ import annotations

import pytest

from kvflow.kv.tiers.policy import LoadCostModel, MarginalRate


def test_the_prior_serves_until_a_step_is_seen() -> None:
    assert MarginalRate(prior=1e-3).value == 1e-3


def test_steps_of_one_size_give_the_mean_seconds_per_token() -> None:
    rate = MarginalRate(prior=1.0)
    for _ in range(5):
        rate.add(512, 0.0512)
    assert rate.value == pytest.approx(1e-4)


def test_a_steps_fixed_cost_is_not_charged_to_its_tokens() -> None:
    """Steps on the line seconds = 24.5 ms + 32.4 us x tokens, mostly small ones (a prefix hit
    computes 16 new tokens): the slope is the per-token cost; the mean would be 1.5x it."""
    rate = MarginalRate(prior=1.0)
    b = 0.265 / 8176
    a = 0.025 - 16 * b
    for n in [16] * 10 + [8192] * 2 + [16] * 3:
        rate.add(n, a + b * n)
    assert rate.value == pytest.approx(b, rel=1e-6)
    assert rate._s / rate._n > 1.4 * b


def test_a_fit_that_is_not_a_positive_slope_falls_back_to_the_mean() -> None:
    rate = MarginalRate(prior=1.0)
    rate.add(16, 0.05)  # the small step slower than the big one (noise)
    rate.add(4096, 0.04)
    assert rate.value == pytest.approx((0.95 * 0.05 + 0.04) / (0.95 * 16 + 4096))  # decayed


def test_a_disk_hit_slower_than_recompute_is_declined_despite_slow_small_steps() -> None:
    """The H200 case: 16-token steps take 25 ms, an 8192-token chunk 290 ms; a 2 MiB block
    reads from disk in 1.2 ms. Recomputing a block costs 16 x 32.4 us = 0.52 ms, so the disk
    loses; charged at 25 ms / 16 tokens per token, it seemed to win by 20x."""
    costs = LoadCostModel(block_bytes=2 << 20, block_size=16)
    for n, s in [(16, 0.025)] * 8 + [(8192, 0.29)] + [(16, 0.025)] * 8:
        costs.observe_prefill(n, s)
    costs.observe_load("disk", 4, 4 * 1.2e-3)
    assert costs.recompute_s(1) == pytest.approx(16 * 0.265 / 8176, rel=1e-6)
    assert not costs.worth_loading("disk", 1)
    costs.observe_load("host", 4, 4 * 5e-5)  # a pinned host copy: 50 us a block
    assert costs.worth_loading("host", 1)
