"""Predictors: constant, moving average, and the Kalman filter's trend and burst handling."""

from __future__ import annotations

import pytest

from kvflow.planner.predict import make_predictor, predictor_names


def _feed(name: str, values: list[float]) -> float:
    p = make_predictor(name)
    for v in values:
        p.observe(v)
    return p.predict()


def test_registered_by_name() -> None:
    assert set(predictor_names()) >= {"constant", "moving_average", "kalman"}
    with pytest.raises(ValueError, match="unknown predictor 'arima'"):
        make_predictor("arima")


def test_constant_and_moving_average() -> None:
    assert _feed("constant", [1, 5, 3]) == 3
    assert _feed("moving_average", [1, 2, 3, 4, 10]) == pytest.approx((2 + 3 + 4 + 10) / 4)
    assert _feed("moving_average", []) == 0.0


def test_kalman_anticipates_a_ramp() -> None:
    ramp = [10.0 + 2.0 * i for i in range(30)]  # next value: 70
    kalman = _feed("kalman", ramp)
    assert abs(kalman - 70.0) < 3.0
    assert kalman > _feed("moving_average", ramp) + 4  # the average lags the trend
    assert kalman > _feed("constant", ramp)


def test_kalman_is_steady_on_noise_and_follows_a_burst_at_once() -> None:
    noisy = [20.0 + (1.0 if i % 2 else -1.0) for i in range(40)]
    assert abs(_feed("kalman", noisy) - 20.0) < 1.5
    assert _feed("kalman", [*noisy, 60.0]) >= 55.0  # believed at once, not averaged
    assert _feed("kalman", [5.0, 0.0, 0.0, 0.0]) >= 0.0  # never negative


def _counted(values: list[float], count_s: float) -> float:
    p = make_predictor("kalman")
    for v in values:
        p.observe(v, count_s)
    return p.predict()


def test_kalman_takes_a_short_interval_s_counting_noise_for_noise_not_a_burst() -> None:
    steady = [10.0] * 40
    # 10 req/s counted over 1 s: Poisson variance 10 (sd 3.2), so 16 is 1.9 sd: noise (as
    # likely as 1 second in 25). After 40 steady steps the forecast's variance is 3.0, so the
    # gains are 3.0 / 13 = 0.23 on the level and 0.36 / 13 = 0.03 on the slope: the forecast
    # moves by 0.26 x 6 = 1.6, not 6.
    assert _counted([*steady, 16.0], 1.0) == pytest.approx(11.6, abs=0.05)
    # Without the count the noise is 10% of the magnitude (sd 1.6 at 16) and the forecast's
    # variance 0.7: 6 > 3 x sqrt(2.6 + 0.7), a burst.
    assert _counted([*steady, 16.0], 0.0) == pytest.approx(16.0)
    # A 2.5x burst is 4.7 Poisson sd: believed at once.
    assert _counted([*steady, 25.0], 1.0) == pytest.approx(25.0)
    # Counted over 10 s the Poisson sd is 1.0, under the 10% floor: as without a count.
    assert _counted([*steady, 16.0], 10.0) == pytest.approx(16.0)
