"""Calibration by load level: requests pooled (their p90), interpolated between levels, used by estimate."""

from __future__ import annotations

import math

import pytest

from kvflow.planner.model import Fleet, Load, estimate, per_worker_rates
from kvflow.planner.perf import Calibration, quantile
from tests.planner.test_decide import FLAT


def _at(*ratios_counts: tuple[float, int], predicted: float = 0.02):
    """Requests at ratio x of `predicted`, as the simulator reports them (one point each)."""
    return tuple((x * predicted, x * predicted, float(n)) for x, n in ratios_counts)


def test_the_factor_is_the_p90_of_the_pooled_requests_not_a_mean_of_interval_p90s() -> None:
    calib = Calibration()
    calib.update(5.0, 5.0, 1.0, (), 0.02, _at((1.0, 9), (2.0, 1)))
    assert calib.factor("itl", 5.0) == 1.0  # 10 < 20 requests: not used yet
    assert calib.factor("ttft", 5.0) == 1.0  # not observed
    calib.update(5.0, 5.0, 1.0, (), 0.02, _at((1.0, 9), (2.0, 1)))
    calib.update(5.0, 5.0, 1.0, (), 0.02, _at((1.0, 8), (2.0, 2)))
    # Each interval's nearest-rank p90 (the 9th of 10) is 1, 1 and 2x: their mean log gives
    # 2^(1/3) = 1.26. Pooled, 4 of 30 requests (13%) are at 2x, so the p90 (the 27th of 30) is 2x.
    assert calib.factor("itl", 5.0) == pytest.approx(2.0)
    # And the other way: 8 at 1x + 2 at 2x, then 10 at 1x: interval p90s 2 and 1 (mean log:
    # 1.41); pooled, 2 of 20 are over 1x: the p90 (the 18th) is 1x.
    other = Calibration()
    other.update(5.0, 5.0, 1.0, (), 0.02, _at((1.0, 8), (2.0, 2)))
    other.update(5.0, 5.0, 1.0, (), 0.02, _at((1.0, 10)))
    assert other.factor("itl", 5.0) == pytest.approx(1.0)


def test_a_bucket_s_requests_are_spread_over_it_and_points_and_spreads_mix() -> None:
    calib = Calibration()
    # 20 requests in the frontend's (0.02, 0.05] ITL bucket, predicted 0.02: ratios even over
    # [1, 2.5], so the p90 is 1 + 0.9 x 1.5 = 2.35.
    calib.update(5.0, 5.0, 1.0, (), 0.02, ((0.02, 0.05, 20.0),))
    assert calib.factor("itl", 5.0) == pytest.approx(2.35)
    # 10 points at 1 and 10 spread over [1, 3]: 0.9 x 20 = 18 is reached 8/10 of the way along
    # the spread: 1 + 0.8 x 2 = 2.6.
    assert quantile([[1.0, 1.0, 10.0], [1.0, 3.0, 10.0]], 0.9) == pytest.approx(2.6)
    assert quantile([[2.0, 2.0, 1.0], [1.0, 1.0, 9.0]], 0.9) == 1.0  # nearest rank: the 9th of 10


def test_levels_are_interpolated_in_log_rate_and_held_beyond() -> None:
    calib = Calibration()
    # Level k holds rates in [1.25^k, 1.25^(k+1)): 1.6 req/s is level 2, 5 req/s level 7.
    assert (calib.level(1.6), calib.level(5.0)) == (2, 7)
    calib.update(1.6, 1.6, 1.0, (), 0.02, _at((1.5, 20)))  # 1.5x at light load
    calib.update(5.0, 5.0, 1.0, (), 0.02, _at((0.8, 20)))  # 0.8x when busy
    assert calib.factor("itl", 1.0) == pytest.approx(1.5)  # below the lightest level seen
    assert calib.factor("itl", 10.0) == pytest.approx(0.8)  # above the busiest
    # Halfway between the levels' centres (1.25^2.5 and 1.25^7.5) in log rate: 1.25^5.
    assert calib.factor("itl", 1.25 ** 5) == pytest.approx(math.sqrt(1.5 * 0.8))


def test_old_requests_fade_beyond_memory_and_odd_ratios_are_clamped() -> None:
    calib = Calibration(memory=300.0)
    calib.update(5.0, 5.0, 1.0, (), 0.02, _at((1.0, 300)))
    calib.update(5.0, 5.0, 1.0, (), 0.02, _at((2.0, 20)))
    # 300 + 20 > 300: the old fade to 280, so 20 of 300 (6.7%) are at 2x: the p90 is 1x.
    assert calib.levels["itl"][7].total == pytest.approx(300.0)
    assert calib.factor("itl", 5.0) == pytest.approx(1.0)
    calib.update(5.0, 5.0, 1.0, (), 0.02, _at((2.0, 20)))
    # Then 280 x 14/15 = 261.3 at 1x and 20 x 14/15 + 20 = 38.7 at 2x (12.9%): 2x.
    assert calib.factor("itl", 5.0) == pytest.approx(2.0)
    clamped = Calibration()
    clamped.update(5.0, 5.0, 0.1, ((10.0, 10.0, 20.0),), 0.02, ())  # TTFT 100x the prediction
    assert clamped.factor("ttft", 5.0) == pytest.approx(4.0)
    assert clamped.factor("itl", 5.0) == 1.0


def test_estimate_corrects_each_fleet_at_its_own_per_worker_rate() -> None:
    calib = Calibration()
    calib.update(5.0, 5.0, 1.0, (), 0.02, _at((0.5, 20)))  # 0.5x at 5 req/s per worker
    calib.update(2.5, 2.5, 1.0, (), 0.02, _at((1.0, 20)))  # 1x at 2.5 req/s per worker
    load = Load(10, 512, 100)
    for n, each in ((2, 5.0), (4, 2.5)):
        plain = estimate(Fleet(aggregated=n), load, FLAT)
        corrected = estimate(Fleet(aggregated=n), load, FLAT, calib)
        assert corrected[1] == pytest.approx(plain[1] * calib.factor("itl", each))
        assert corrected[0] == pytest.approx(plain[0])  # TTFT: nothing observed
    # Levels 4 (2.5) and 7 (5.0); 5.0 sits 2.71 level-widths above level 4's centre, 2.5 below it.
    x = math.log(5.0) / math.log(1.25) - 0.5
    assert calib.factor("itl", 5.0) == pytest.approx(math.exp(math.log(0.5) * (x - 4) / 3))  # 0.534
    assert calib.factor("itl", 2.5) == pytest.approx(1.0)
    assert per_worker_rates(Fleet(prefill=2, decode=4), 8.0) == (4.0, 2.0)
    assert per_worker_rates(Fleet(aggregated=0), 8.0) == (0.0, 0.0)
