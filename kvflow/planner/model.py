"""Pure sizing math: predicted TTFT and ITL of a fleet shape under a load, from a PerfModel.

Queueing is approximated per worker. Prefill is an M/D/1 queue (mean wait
rho*p / 2(1-rho), and the 90th percentile taken as 2.3x the mean wait, the ratio
for an exponential tail); decode batch size follows Little's law (a worker holds
rate x OSL x ITL sequences), solved as a fixed point because ITL grows with batch.
On aggregated workers, prefill takes a share rho_p of the time, but its steps also carry
every running sequence's next token (the engine batches decodes with a prefill): a worker
makes (1 - rho_p) / decode_step + rate steps a second, and the ITL is one over that.
The p90 ITL is that at the 90th percentile of the prefill work arriving over a request's life
(compound Poisson: the prompt length's spread, isl_cv2, widens it where prefill time grows
with length).
The Calibration factors correct all of this with what the fleet really reports, each at the
per-worker rate it was observed at (see `per_worker_rates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kvflow.planner.perf import Calibration, PerfModel

P90_WAIT = 2.3
Z90 = 1.28  # the normal distribution's 90th percentile, in standard deviations
MAX_UTIL = 0.95
INFEASIBLE = float("inf")


@dataclass(frozen=True)
class Load:
    """Traffic of one interval: request rate and its average shape."""

    rate: float  # requests per second
    isl: float  # mean prompt tokens
    osl: float  # mean output tokens
    cached_fraction: float = 0.0  # of prompt tokens, served from caches
    isl_cv2: float = 0.0  # prompt length's variance / its mean squared (0: every prompt alike)
    # The uncached prompt tokens' distribution: (bucket upper edge, share of requests), every
    # bucket listed in order (empty ones too): a bucket's lower edge is the previous one's upper
    # edge (0 for the first), the open last one's upper edge is inf; () when unknown.
    uncached: tuple[tuple[float, float], ...] = ()

    def scaled(self, factor: float) -> Load:
        return replace(self, rate=self.rate * factor)

    @property
    def isl_square(self) -> float:
        """The mean squared prompt length (what pools across intervals)."""
        return self.isl * self.isl * (1 + self.isl_cv2)


def cv2(square: float, mean: float) -> float:
    """Variance / mean squared, from the mean of the squares and the mean (never below 0)."""
    return max(square / (mean * mean) - 1, 0.0) if mean > 0 else 0.0


@dataclass(frozen=True)
class Fleet:
    """Worker counts by role; aggregated and disaggregated pools are not mixed."""

    aggregated: int = 0
    prefill: int = 0
    decode: int = 0

    @property
    def workers(self) -> int:
        return self.aggregated + self.prefill + self.decode

    @property
    def disaggregated(self) -> bool:
        return self.prefill > 0 or self.decode > 0

    def __str__(self) -> str:
        if self.disaggregated:
            return f"{self.prefill}P+{self.decode}D"
        return f"{self.aggregated} aggregated"


@dataclass(frozen=True)
class Estimate:
    """What a fleet shape would give under a load."""

    fleet: Fleet
    ttft_s: float
    itl_s: float
    gpus: int
    meets: bool

    def slack(self, ttft_sla: float, itl_sla: float) -> float:
        """How far inside the SLA (1.0 = at it; larger is safer)."""
        return min(ttft_sla / max(self.ttft_s, 1e-9), itl_sla / max(self.itl_s, 1e-9))


def _decode_itl(perf: PerfModel, rate: float, load: Load, share: float,
                prefill_steps: float = 0.0) -> tuple[float, float]:
    """(ITL, batch) of one worker getting `rate` req/s, with `share` of its time for decode steps
    and `prefill_steps` other steps a second (prefills) that each also advance every sequence."""
    context = load.isl + load.osl / 2

    def itl_at(batch: float) -> float:
        return 1.0 / (share / perf.decode_step(batch, context) + prefill_steps)
    batch = 1.0
    for _ in range(60):
        itl = itl_at(batch)
        nxt = max(rate * load.osl * itl, 1.0)
        if nxt > perf.max_batch:
            return INFEASIBLE, nxt
        if abs(nxt - batch) < 1e-3:
            break
        batch = nxt
    return itl_at(batch), batch


Shares = tuple[tuple[float, float], ...]  # (bucket upper edge, share of requests), as Load.uncached


def merge_shares(parts: list[tuple[float, Shares]]) -> Shares:
    """The weighted mean of several (edge, share) distributions, as (edge, share) by edge; ()
    when none has weight."""
    total = sum(w for w, shares in parts if shares)
    if total <= 0:
        return ()
    merged: dict[float, float] = {}
    for w, shares in parts:
        for edge, share in shares:
            merged[edge] = merged.get(edge, 0.0) + w * share / total
    return tuple(sorted(merged.items()))


def _prefill_moments(perf: PerfModel, load: Load) -> tuple[float, float]:
    """(mean prefill time of one request, its variance / mean squared).

    With the uncached prompt tokens' distribution (`Load.uncached`): each bucket's requests are
    taken at the bucket's centre (the open last bucket: at its lower edge), all centres scaled
    so that their mean is the known mean of uncached tokens, isl x (1 - cached fraction); the
    moments are those of prefill_time over these points. The prefill-time curve is convex (a
    step costs at least one read of the weights; attention grows with the square), so the mean
    of the times is over the time of the mean: on the bench's mix (a third of the prompt
    tokens cached, unevenly) 61 ms a request, where the mean prompt takes 52 ms.
    Without it: the time of the mean, and the spread of one standard deviation of the prompt
    length (isl_cv2) through the curve."""
    tokens = max(load.isl * (1 - load.cached_fraction), 1.0)
    if load.uncached and sum(s for _, s in load.uncached) > 0:
        points, lower = [], 0.0
        for edge, share in load.uncached:
            points.append(((lower + edge) / 2 if edge < math.inf else lower, share))
            lower = edge if edge < math.inf else lower
        total = sum(s for _, s in points)
        mean = sum(x * s for x, s in points) / total
        times = [(perf.prefill_time(max(x * tokens / mean, 1.0)), s / total) for x, s in points]
        first = sum(t * s for t, s in times)
        second = sum(t * t * s for t, s in times)
        return first, cv2(second, first)
    mean = perf.prefill_time(tokens)
    sd = perf.prefill_time(tokens * (1 + math.sqrt(max(load.isl_cv2, 0.0)))) - mean
    return mean, (sd / mean) ** 2 if mean > 0 else 0.0


def _itl_p90(perf: PerfModel, rate: float, load: Load,
             prefill: tuple[float, float] | None) -> tuple[float, float]:
    """(ITL p90, mean decode batch) of one worker getting `rate` req/s, doing their prefills too
    if `prefill` gives their (mean time, cv^2) (`_prefill_moments`). A request's ITL is the mean
    step time over its life, and the prefill work arriving over a life of L = OSL x ITL seconds
    is compound Poisson: its variance is rate x L x E[p^2] = rate x L x mean(p)^2 x (1 + cv^2).
    The p90 ITL is the mean ITL at the load that brings the 90th percentile of that work,
    rate + 1.28 sqrt(rate (1 + cv^2) / L)."""
    def mean_itl(r: float) -> tuple[float, float]:
        if prefill is None:
            return _decode_itl(perf, r, load, 1.0)
        rho = r * prefill[0]
        if rho >= MAX_UTIL:
            return INFEASIBLE, INFEASIBLE
        # A prefill step also advances every running sequence by a token (the engine batches
        # decodes with a prefill): decode loses the prefill time but not those steps' tokens.
        return _decode_itl(perf, r, load, 1 - rho, prefill_steps=r)
    itl, batch = mean_itl(rate)
    if itl == INFEASIBLE or rate <= 0:
        return itl, batch
    spread = 1 + (prefill[1] if prefill is not None else 0.0)
    return mean_itl(rate + Z90 * math.sqrt(rate * spread / (load.osl * itl)))[0], batch


def _queued(p: float, rho: float) -> float:
    return p + P90_WAIT * rho * p / (2 * (1 - rho))


def per_worker_rates(fleet: Fleet, rate: float) -> tuple[float, float]:
    """Requests per second per worker on (the prefill side, the decode side): the load levels the
    calibration is kept by. Aggregated workers do both; an empty pool gets 0."""
    if fleet.disaggregated:
        return (rate / fleet.prefill if fleet.prefill else 0.0, rate / fleet.decode if fleet.decode else 0.0)
    each = rate / fleet.aggregated if fleet.aggregated else 0.0
    return each, each


def estimate(fleet: Fleet, load: Load, perf: PerfModel, calib: Calibration | None = None,
             gpus_per_worker: int = 1) -> tuple[float, float]:
    """Predicted (TTFT p90, ITL) of `fleet` under `load`; inf where it cannot keep up."""
    calib = calib or Calibration()
    if fleet.disaggregated:
        ttft, itl = _disaggregated(fleet, load, perf)
    else:
        ttft, itl = _aggregated(fleet.aggregated, load, perf)
    f_ttft, f_itl = calib.factors(*per_worker_rates(fleet, load.rate))
    return ttft * f_ttft, itl * f_itl


def _aggregated(n: int, load: Load, perf: PerfModel) -> tuple[float, float]:
    if n <= 0:
        return INFEASIBLE, INFEASIBLE
    rate = load.rate / n
    moments = _prefill_moments(perf, load)
    p, rho = moments[0], rate * moments[0]
    if rho >= MAX_UTIL:
        return INFEASIBLE, INFEASIBLE
    itl, batch = _itl_p90(perf, rate, load, prefill=moments)
    if itl == INFEASIBLE:
        return INFEASIBLE, INFEASIBLE
    step = perf.decode_step(batch, load.isl + load.osl / 2)
    return step + _queued(p, rho), itl


def _disaggregated(fleet: Fleet, load: Load, perf: PerfModel) -> tuple[float, float]:
    if fleet.prefill <= 0 or fleet.decode <= 0:
        return INFEASIBLE, INFEASIBLE
    p = _prefill_moments(perf, load)[0]
    rho = load.rate / fleet.prefill * p
    if rho >= MAX_UTIL:
        return INFEASIBLE, INFEASIBLE
    itl, batch = _itl_p90(perf, load.rate / fleet.decode, load, prefill=None)
    if itl == INFEASIBLE:
        return INFEASIBLE, INFEASIBLE
    first_step = perf.decode_step(batch, load.isl + load.osl / 2)
    return _queued(p, rho) + perf.transfer_time(load.isl) + first_step, itl
