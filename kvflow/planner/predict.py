"""Load predictors, registered by name: constant, moving_average and kalman (trend + bursts).

Each predictor sees one number per interval (e.g. the request rate) and forecasts the
next interval's value. A rate counted over `count_s` seconds says so (`observe(value,
count_s)`): its counting noise is known (Poisson: variance rate / count_s), which the
Kalman filter uses so that short intervals' noise is neither chased nor taken for a
burst. The Kalman filter tracks level and trend (a local linear trend model) so a ramp
is anticipated one interval ahead, and its innovation check lets a burst through at once
instead of averaging it away. It is a few lines of arithmetic, which is why no
forecasting library is pulled in: those fit seasonal models over hours of history, while
a planner interval needs a one-step forecast that reacts now.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

# How many standard deviations above the expected rate a measurement must be to be taken
# for a burst (the Kalman filter's jump, and the planner's burst baseline: planner.py).
BURST_SIGMAS = 3.0


class Predictor(Protocol):
    def observe(self, value: float, count_s: float = 0.0) -> None: ...

    def predict(self) -> float: ...


_PREDICTORS: dict[str, Callable[[], Predictor]] = {}


def register_predictor(name: str) -> Callable[[Callable[[], Predictor]], Callable[[], Predictor]]:
    def add(factory: Callable[[], Predictor]) -> Callable[[], Predictor]:
        _PREDICTORS[name] = factory
        return factory
    return add


def predictor_names() -> tuple[str, ...]:
    return tuple(_PREDICTORS)


def make_predictor(name: str) -> Predictor:
    if name not in _PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; use one of {', '.join(_PREDICTORS)}")
    return _PREDICTORS[name]()


@register_predictor("constant")
class ConstantPredictor:
    """The next interval looks like the last one."""

    def __init__(self) -> None:
        self.last = 0.0

    def observe(self, value: float, count_s: float = 0.0) -> None:
        self.last = value

    def predict(self) -> float:
        return self.last


@register_predictor("moving_average")
class MovingAveragePredictor:
    """Mean of the last `window` intervals."""

    def __init__(self, window: int = 4) -> None:
        self.values: deque[float] = deque(maxlen=window)

    def observe(self, value: float, count_s: float = 0.0) -> None:
        self.values.append(value)

    def predict(self) -> float:
        return sum(self.values) / len(self.values) if self.values else 0.0


@register_predictor("kalman")
class KalmanPredictor:
    """Local linear trend Kalman filter: state (level, slope), one-step-ahead forecast.

    `q_level`/`q_slope` are process noise relative to the observation noise `r`; a
    measurement further than `burst_sigmas` standard deviations from the forecast
    resets the level to it (a burst is believed at once, not averaged in). The
    observation noise is `r` x (10% of the running magnitude)^2, and for a rate counted
    over `count_s` seconds at least the Poisson variance of the count at the forecast
    rate (forecast / count_s): at 10 req/s over 1 s that is a standard deviation of
    3.2 req/s, so a 14 is noise and a 25 (a 2.5x burst) is believed at once.
    """

    def __init__(self, q_level: float = 0.05, q_slope: float = 0.01, r: float = 1.0,
                 burst_sigmas: float = BURST_SIGMAS) -> None:
        self.q_level, self.q_slope, self.r = q_level, q_slope, r
        self.burst_sigmas = burst_sigmas
        self.level = self.slope = 0.0
        self.p = [[1.0, 0.0], [0.0, 1.0]]
        self.scale = 0.0  # running magnitude, so the noise terms are relative
        self.seen = 0

    def observe(self, value: float, count_s: float = 0.0) -> None:
        self.seen += 1
        self.scale = max(abs(value), 0.9 * self.scale + 0.1 * abs(value), 1e-9)
        if self.seen == 1:
            self.level = value
            return
        level_pred, slope = self.level + self.slope, self.slope
        p = self._predicted_covariance()
        r = self.r * (0.1 * self.scale) ** 2
        if count_s > 0:
            r = max(r, max(level_pred, 0.0) / count_s)
        innovation = value - level_pred
        s = p[0][0] + r
        if innovation * innovation > (self.burst_sigmas**2) * s and innovation > 0:
            self.level, self.slope = value, max(slope, 0.0)  # a burst: jump, keep no down-trend
            self.p = [[s, 0.0], [0.0, p[1][1]]]
            return
        k0, k1 = p[0][0] / s, p[1][0] / s
        self.level = level_pred + k0 * innovation
        self.slope = slope + k1 * innovation
        self.p = [[(1 - k0) * p[0][0], (1 - k0) * p[0][1]],
                  [p[1][0] - k1 * p[0][0], p[1][1] - k1 * p[0][1]]]

    def _predicted_covariance(self) -> list[list[float]]:
        (a, b), (c, d) = self.p
        q = (0.1 * self.scale) ** 2
        # F = [[1, 1], [0, 1]]: P' = F P F^T + Q
        return [[a + b + c + d + self.q_level * q, b + d], [c + d, d + self.q_slope * q]]

    def predict(self) -> float:
        return max(0.0, self.level + self.slope)
