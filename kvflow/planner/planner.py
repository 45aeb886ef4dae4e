"""Planner: one interval is observe → predict → decide; acting is the connector's business.

The rate is forecast by the configured predictor; prompt/output lengths and the
cached fraction by a moving average (they drift slowly). After each observed
interval, the performance model is calibrated (`Calibration`, by load level): the
observed TTFT/ITL p90 against what the model predicts for the fleet that served them,
at the load those requests met: the arrivals over the last request duration (at least
one interval), per worker, which is also the level the interval is pooled at. After
a fleet change, intervals are not used until `settle_s` (a worker's start-up time)
plus one predicted request duration (OSL x ITL) have passed: until then the requests
finishing were served, at least in part, by a fleet other than the one set. Likewise
from the interval where a burst begins until one predicted request duration after it: the
requests finishing then lived through a step in the load, which the model (a steady load)
does not describe, and the levels a burst's load falls in are otherwise seen rarely, so a
few such intervals would set their factor (and with it the burst reserve's fleet). The
baseline rate for the burst reserve (`Rules.burst_ratio`) is the median observed rate
over the last `baseline_s` seconds, leaving out the bursts themselves (`_record_rate`), and
the reserve is sized in the request shape of the same intervals (`baseline_shape`), not in
the last few intervals' (the prediction's), whose noise would move the reserve's fleet. A
burst begins with an interval whose rate is over burst_ratio x the baseline and, for its
count, BURST_SIGMAS Poisson standard deviations over it (at 1 s intervals a rate over
1.5x a baseline of 5 req/s is often noise). It ends when the intervals since are likelier
at the baseline than at the burst's own mean rate, by a log-likelihood ratio (Poisson
counts, summed while it stays positive: a CUSUM) over BURST_SIGMAS^2 / 2, the evidence
of a BURST_SIGMAS-sigma deviation. Until then every interval is left out, also those
under burst_ratio x the baseline: a 2.5x burst counted in 1 s is often under 2x the
baseline, and when such intervals were counted, they raised the median, which let in
more of the burst, and the reserve then stayed on the burst's rate after it. A burst that
lasts `baseline_s` is the new normal: its intervals are counted from then on. Otherwise
a burst half as long as `baseline_s` would move the median to its own rate, and the
reserve to a multiple of it, for as long again after it ended.
"""

from __future__ import annotations

import logging
import math
from collections import deque

from kvflow.planner.decide import Decision, PlanState, Rules, plan_step
from kvflow.planner.model import Fleet, Load, cv2, estimate, merge_shares, per_worker_rates
from kvflow.planner.observe import Observation
from kvflow.planner.perf import Calibration, PerfModel
from kvflow.planner.predict import BURST_SIGMAS, MovingAveragePredictor, make_predictor

log = logging.getLogger(__name__)
MAX_LOOKBACK_S = 60.0  # the longest span of arrivals taken as the load that finished requests met


class Planner:
    def __init__(self, rules: Rules, perf: PerfModel, fleet: Fleet, predictor: str = "kalman",
                 calibrate: bool = True, settle_s: float = 0.0, baseline_s: float = 120.0) -> None:
        self.rules, self.perf = rules, perf
        self.state = PlanState(fleet)
        self.rate = make_predictor(predictor)
        self.shape = [MovingAveragePredictor(4) for _ in range(4)]  # isl, osl, cached fraction, isl^2
        self.uncached: deque[tuple[tuple[float, float], ...]] = deque(maxlen=4)  # as the shape's window
        self.calib = Calibration()
        self.calibrate = calibrate
        self.settle_s = settle_s
        self.calibrate_from = float("-inf")  # intervals starting earlier are not calibrated on
        self.baseline_s = baseline_s
        self.rates: deque[tuple[float, float]] = deque()  # (at_s, observed rate) over baseline_s
        self.base_obs: deque[Observation] = deque()  # the observations those rates are of (their shape)
        self.burst_since: float | None = None  # start of the burst in progress (None: none)
        self.burst_requests = self.burst_seconds = 0.0  # its arrivals and duration so far
        self.burst_end_evidence = 0.0  # its CUSUM: log-likelihood ratio, baseline over the burst's rate
        self.recent: deque[Observation] = deque()  # observations over the last MAX_LOOKBACK_S
        self.serve_s = 0.0  # the latest predicted request duration (first token + OSL x ITL)
        self.decisions: list[Decision] = []
        self._seen = False

    @property
    def fleet(self) -> Fleet:
        return self.state.fleet

    def step(self, now: float, obs: Observation | None) -> Decision:
        predicted = self._predict(obs)
        decision, self.state = plan_step(self.state, now, predicted, self.perf, self.rules, self.calib,
                                         self.baseline(), obs.held if obs is not None else 0,
                                         self.baseline_shape())
        if decision.target != decision.previous:
            chosen, load = decision.chosen, decision.predicted
            serve = load.osl * chosen.itl_s if chosen and load and chosen.itl_s < float("inf") else 0.0
            self.calibrate_from = now + self.settle_s + serve
        self.decisions.append(decision)
        del self.decisions[:-1000]
        return decision

    def baseline(self) -> float:
        """The median observed rate over the last baseline_s, bursts left out (see _record_rate):
        the daily trend moves it, a burst does not."""
        if not self.rates:
            return 0.0
        ordered = sorted(r for _, r in self.rates)
        return ordered[len(ordered) // 2]

    def baseline_shape(self) -> Load | None:
        """The request shape of the baseline's intervals (request-weighted, rate 0): what the burst
        reserve is sized in. None before any of them held a request."""
        return _pooled(list(self.base_obs), 0.0)

    def _predict(self, obs: Observation | None) -> Load | None:
        if obs is None:
            return None
        self.rate.observe(obs.load.rate, obs.interval_s)
        self._record_rate(obs)
        self.recent.append(obs)
        while self.recent and self.recent[0].at_s <= obs.at_s - MAX_LOOKBACK_S:
            self.recent.popleft()
        if obs.requests:
            shape = (obs.load.isl, obs.load.osl, obs.load.cached_fraction, obs.load.isl_square)
            for p, v in zip(self.shape, shape, strict=True):
                p.observe(v)
            if obs.load.uncached:
                self.uncached.append(obs.load.uncached)
            self._seen = True
        self._calibrate(obs)
        if not self._seen:
            return Load(0.0, 1.0, 1.0)
        isl, osl, cached, square = (p.predict() for p in self.shape)
        isl = max(isl, 1.0)
        uncached = merge_shares([(1.0, u) for u in self.uncached]) if self.uncached else ()
        return Load(self.rate.predict(), isl, max(osl, 1.0), cached, cv2(square, isl), uncached)

    def _record_rate(self, obs: Observation) -> None:
        """Keep the interval's rate for the baseline unless it is part of a burst that has
        lasted less than baseline_s (the module's docstring says when a burst begins and ends)."""
        while self.rates and self.rates[0][0] <= obs.at_s - self.baseline_s:
            self.rates.popleft()
        while self.base_obs and self.base_obs[0].at_s <= obs.at_s - self.baseline_s:
            self.base_obs.popleft()
        if self.burst_since is None:
            if self._begins_burst(obs):
                self.burst_since = obs.at_s - obs.interval_s
                # The requests finishing over the next request duration lived through the step
                # in the load: not what the model (steady load) describes; not calibrated on.
                self.calibrate_from = max(self.calibrate_from, obs.at_s + self.serve_s)
                self.burst_requests = self.burst_seconds = self.burst_end_evidence = 0.0
        elif self._ends_burst(obs):
            self.burst_since = None
        if self.burst_since is not None:
            self.burst_requests += obs.load.rate * obs.interval_s
            self.burst_seconds += obs.interval_s
            if obs.at_s - self.burst_since < self.baseline_s:
                return
        self.rates.append((obs.at_s, obs.load.rate))
        self.base_obs.append(obs)

    def _begins_burst(self, obs: Observation) -> bool:
        """Over burst_ratio x the baseline, and significantly so for a count over the interval."""
        base, ratio, count_s = self.baseline(), self.rules.burst_ratio, obs.interval_s
        if ratio <= 0 or base <= 0 or obs.load.rate <= ratio * base:
            return False
        return count_s <= 0 or obs.load.rate > base + BURST_SIGMAS * math.sqrt(base / count_s)

    def _ends_burst(self, obs: Observation) -> bool:
        """The intervals since the burst began are likelier at the baseline than at the burst's
        mean rate, by a summed log-likelihood ratio over BURST_SIGMAS^2 / 2 (Poisson counts)."""
        base, count_s = self.baseline(), obs.interval_s
        burst = self.burst_requests / self.burst_seconds if self.burst_seconds else obs.load.rate
        if base <= 0 or burst <= base:
            return True
        count = obs.load.rate * count_s
        log_ratio = count * math.log(base / burst) - (base - burst) * count_s
        self.burst_end_evidence = max(0.0, self.burst_end_evidence + log_ratio)
        return self.burst_end_evidence > BURST_SIGMAS**2 / 2

    def _met_load(self, obs: Observation) -> Load:
        """The load the interval's finished requests met: arrivals over the last serve_s (at least
        this interval; `recent` holds it already), their shape request-weighted."""
        span = min(max(self.serve_s, obs.interval_s), MAX_LOOKBACK_S)
        pooled = [o for o in self.recent if o.at_s > obs.at_s - span] or [obs]
        seconds = sum(o.interval_s for o in pooled)
        return _pooled(pooled, sum(o.requests for o in pooled) / seconds) or obs.load

    def _calibrate(self, obs: Observation) -> None:
        load = self._met_load(obs)
        if not self.calibrate or not obs.requests:
            return
        ttft, itl = estimate(self.fleet, load, self.perf)
        if itl < float("inf"):
            self.serve_s = ttft + load.osl * itl
        if obs.at_s - obs.interval_s < self.calibrate_from:
            return  # new workers were still starting (or old ones draining) during this interval
        if ttft == float("inf") or itl == float("inf"):
            return
        self.calib.update(*per_worker_rates(self.fleet, load.rate), ttft, obs.ttft_bins, itl, obs.itl_bins)

    def reconcile(self, actual: Fleet) -> str | None:
        """When the real fleet differs from what was last set, adopt it and say so."""
        if actual == self.state.fleet:
            return None
        message = f"the fleet is {actual}, not the {self.state.fleet} last set; re-planning from it"
        self.state = PlanState(actual, self.state.last_change_s, 0)
        return message


def _pooled(observed: list[Observation], rate: float) -> Load | None:
    """The observations' request shape, request-weighted, at `rate`; None when they hold no request."""
    n = sum(o.requests for o in observed)
    if not n:
        return None
    isl = sum(o.requests * o.load.isl for o in observed) / n
    osl = sum(o.requests * o.load.osl for o in observed) / n
    cached = sum(o.requests * o.load.cached_fraction for o in observed) / n
    square = sum(o.requests * o.load.isl_square for o in observed) / n
    uncached = merge_shares([(o.requests, o.load.uncached) for o in observed if o.load.uncached])
    return Load(rate, isl, osl, cached, cv2(square, isl), uncached)
