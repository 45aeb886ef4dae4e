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
