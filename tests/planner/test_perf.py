"""Calibration by load level: pooled, interpolated between levels, used by estimate at each fleet's load."""

from __future__ import annotations

import math

import pytest

from kvflow.planner.model import Fleet, Load, estimate, per_worker_rates
from kvflow.planner.perf import Calibration
from tests.planner.test_decide import FLAT


def test_intervals_pool_until_a_level_holds_min_requests() -> None:
    calib = Calibration()
    calib.update(5.0, 5.0, 10, 1.0, None, 0.02, 0.04)  # ITL observed 2x the prediction, 10 requests
    assert calib.factor("itl", 5.0) == 1.0  # 10 < 20 requests: not used yet
    calib.update(5.0, 5.0, 10, 1.0, None, 0.02, 0.02)  # 1x, 10 more
    # Request-weighted mean of the log ratios: (log 2 + log 1) / 2 -> sqrt(2).
    assert calib.factor("itl", 5.0) == pytest.approx(math.sqrt(2.0))
    assert calib.factor("ttft", 5.0) == 1.0  # not observed


def test_levels_are_interpolated_in_log_rate_and_held_beyond() -> None:
    calib = Calibration()
    # Level k holds rates in [1.25^k, 1.25^(k+1)): 1.6 req/s is level 2, 5 req/s level 7.
    assert (calib.level(1.6), calib.level(5.0)) == (2, 7)
    calib.update(1.6, 1.6, 20, 1.0, None, 0.02, 0.03)  # 1.5x at light load
    calib.update(5.0, 5.0, 20, 1.0, None, 0.02, 0.016)  # 0.8x when busy
    assert calib.factor("itl", 1.0) == pytest.approx(1.5)  # below the lightest level seen
    assert calib.factor("itl", 10.0) == pytest.approx(0.8)  # above the busiest
    # Halfway between the levels' centres (1.25^2.5 and 1.25^7.5) in log rate: 1.25^5.
    assert calib.factor("itl", 1.25 ** 5) == pytest.approx(math.sqrt(1.5 * 0.8))


def test_old_requests_fade_beyond_memory_and_odd_ratios_are_clamped() -> None:
    calib = Calibration(memory=300.0)
    calib.update(5.0, 5.0, 300, 1.0, None, 0.02, 0.02)
    calib.update(5.0, 5.0, 300, 1.0, None, 0.02, 0.04)  # mean log: log 2 / 2, then 300 kept
    assert calib.levels["itl"][7] == [300.0, pytest.approx(math.log(2.0) / 2)]
    calib.update(5.0, 5.0, 300, 1.0, None, 0.02, 0.04)  # log 2 / 2 + (log 2 - log 2 / 2) / 2
    assert calib.factor("itl", 5.0) == pytest.approx(2.0 ** 0.75)
    clamped = Calibration()
    clamped.update(5.0, 5.0, 20, 0.1, 10.0, 0.02, None)  # TTFT 100x the prediction
    assert clamped.factor("ttft", 5.0) == pytest.approx(4.0)


def test_estimate_corrects_each_fleet_at_its_own_per_worker_rate() -> None:
    calib = Calibration()
    calib.update(5.0, 5.0, 20, 1.0, None, 0.02, 0.01)  # 0.5x at 5 req/s per worker
    calib.update(2.5, 2.5, 20, 1.0, None, 0.02, 0.02)  # 1x at 2.5 req/s per worker
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
