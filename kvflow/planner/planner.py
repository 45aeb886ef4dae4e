"""Planner: one interval is observe → predict → decide; acting is the connector's business.

The rate is forecast by the configured predictor; prompt/output lengths and the
cached fraction by a moving average (they drift slowly). After each observed
interval with enough requests, the performance model is calibrated: the observed
TTFT/ITL p90 against what the model predicts for the fleet that served them.
"""

from __future__ import annotations

import logging

from kvflow.planner.decide import Decision, PlanState, Rules, plan_step
from kvflow.planner.model import Fleet, Load, estimate
from kvflow.planner.observe import Observation
from kvflow.planner.perf import Calibration, PerfModel
from kvflow.planner.predict import MovingAveragePredictor, make_predictor

log = logging.getLogger(__name__)
MIN_REQUESTS_TO_CALIBRATE = 20


class Planner:
    def __init__(self, rules: Rules, perf: PerfModel, fleet: Fleet, predictor: str = "kalman",
                 calibrate: bool = True) -> None:
        self.rules, self.perf = rules, perf
        self.state = PlanState(fleet)
        self.rate = make_predictor(predictor)
        self.shape = [MovingAveragePredictor(4) for _ in range(3)]  # isl, osl, cached fraction
        self.calib = Calibration()
        self.calibrate = calibrate
        self.decisions: list[Decision] = []
        self._seen = False

    @property
    def fleet(self) -> Fleet:
        return self.state.fleet

    def step(self, now: float, obs: Observation | None) -> Decision:
        predicted = self._predict(obs)
        decision, self.state = plan_step(self.state, now, predicted, self.perf, self.rules, self.calib)
        self.decisions.append(decision)
        del self.decisions[:-1000]
        return decision

    def _predict(self, obs: Observation | None) -> Load | None:
        if obs is None:
            return None
        self.rate.observe(obs.load.rate)
        if obs.requests:
            for p, v in zip(self.shape, (obs.load.isl, obs.load.osl, obs.load.cached_fraction),
                            strict=True):
                p.observe(v)
            self._seen = True
            self._calibrate(obs)
        if not self._seen:
            return Load(0.0, 1.0, 1.0)
        isl, osl, cached = (p.predict() for p in self.shape)
        return Load(self.rate.predict(), max(isl, 1.0), max(osl, 1.0), cached)

    def _calibrate(self, obs: Observation) -> None:
        if not self.calibrate or obs.requests < MIN_REQUESTS_TO_CALIBRATE:
            return
        ttft, itl = estimate(self.fleet, obs.load, self.perf)
        if ttft == float("inf") or itl == float("inf"):
            return
        self.calib.update(ttft, obs.ttft_p90_s, itl, obs.itl_p90_s)

    def reconcile(self, actual: Fleet) -> str | None:
        """When the real fleet differs from what was last set, adopt it and say so."""
        if actual == self.state.fleet:
            return None
        message = f"the fleet is {actual}, not the {self.state.fleet} last set; re-planning from it"
        self.state = PlanState(actual, self.state.last_change_s, 0)
        return message
