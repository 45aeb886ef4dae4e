"""The planner's decision, a pure function: which fleet meets the SLA at least cost, and when to move.

`choose` enumerates fleet shapes within the bounds and GPU budget and takes the
cheapest that meets the SLA on the planned load: the predicted rate plus headroom,
and, with a `burst_ratio`, also on a burst reserve, that multiple of the baseline rate
(the recent median) in the baseline's request shape (`reserve_load`), so a burst finds
its capacity already there while new workers start. `plan_step` adds
the rules that keep a fleet from oscillating: scale up (or fix a fleet that misses
the SLA) at once; scale down only after `scale_down_intervals` intervals in a row
want it and `cooldown_s` after the last change, to the largest fleet any of those
intervals wanted and by at most `max_scale_down_step` workers per pool; hold, and
say so, when there is no fresh observation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvflow.planner.model import Estimate, Fleet, Load, estimate
from kvflow.planner.perf import Calibration, PerfModel

MODES = ("aggregated", "disaggregated", "auto")


@dataclass(frozen=True)
class Sla:
    ttft_s: float = 1.0  # p90 time to first token
    itl_s: float = 0.04  # p90 inter-token latency


@dataclass(frozen=True)
class Bounds:
    min_workers: int = 1
    max_workers: int = 16
    gpu_budget: int = 0  # 0: no limit beyond max_workers
    gpus_per_worker: int = 1


@dataclass(frozen=True)
class Rules:
    """Everything plan_step needs besides the state and the prediction."""

    sla: Sla = Sla()
    bounds: Bounds = Bounds()
    mode: str = "aggregated"
    headroom: float = 0.1  # plan for predicted load x (1 + headroom)
    burst_ratio: float = 0.0  # and for at least burst_ratio x the baseline rate (0: off)
    scale_down_intervals: int = 3
    cooldown_s: float = 60.0
    max_scale_down_step: int = 1
    # plus held / backlog_drain_s: requests waiting at the router are served within this
    # many seconds on top of the arrivals (0: the hold is not planned for)
    backlog_drain_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"planner mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name in ("headroom", "burst_ratio", "backlog_drain_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"planner {name} must be >= 0; got {getattr(self, name)}")


def planned_load(load: Load, rules: Rules, baseline: float = 0.0, held: int = 0) -> Load:
    """The load a fleet is sized for: prediction x (1 + headroom), at least burst_ratio x baseline
    (pass baseline 0 when the reserve is a load of its own: reserve_load), plus the router's held
    requests spread over backlog_drain_s."""
    rate = max(load.rate * (1 + rules.headroom), baseline * rules.burst_ratio)
    if rules.backlog_drain_s > 0:
        rate += held / rules.backlog_drain_s
    return dataclasses.replace(load, rate=rate)


@dataclass(frozen=True)
class PlanState:
    fleet: Fleet
    last_change_s: float = float("-inf")
    down_votes: int = 0
    down_to: Fleet | None = None  # the largest fleet the intervals voting for a scale-down wanted


def _larger(a: Fleet | None, b: Fleet) -> Fleet:
    """Pool by pool, the larger of two fleets of the same kind (b when they differ in kind)."""
    if a is None or a.disaggregated != b.disaggregated:
        return b
    return Fleet(*(max(x, y) for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b), strict=True)))


@dataclass(frozen=True)
class Decision:
    """One interval's verdict, with what it was based on (shown in logs and /fleet)."""

    at_s: float
    action: str  # "hold" | "scale_up" | "scale_down" | "resplit"
    previous: Fleet
    target: Fleet
    reason: str
    predicted: Load | None = None
    planned: Load | None = None  # what the fleet was sized for (headroom; burst reserve without `reserve`)
    reserve: Load | None = None  # the burst reserve, a load the fleet must also meet (reserve_load)
    chosen: Estimate | None = None
    current: Estimate | None = None
    options: tuple[Estimate, ...] = ()


def _shapes(rules: Rules, mode: str) -> list[Fleet]:
    b = rules.bounds
    top = b.max_workers
    if b.gpu_budget:
        top = min(top, b.gpu_budget // b.gpus_per_worker)
    shapes: list[Fleet] = []
    if mode in ("aggregated", "auto"):
        shapes += [Fleet(aggregated=n) for n in range(max(b.min_workers, 1), top + 1)]
    if mode in ("disaggregated", "auto"):
        shapes += [Fleet(prefill=p, decode=n - p) for n in range(max(b.min_workers, 2), top + 1)
                   for p in range(1, n)]
    return shapes


def evaluate(fleet: Fleet, load: Load, perf: PerfModel, rules: Rules, calib: Calibration,
             reserve: Load | None = None) -> Estimate:
    """The fleet's estimate under `load`; with a `reserve` load too, it meets the SLA only if it
    meets it under both, and the estimate shown is the one with less slack."""
    ttft, itl = estimate(fleet, load, perf, calib)
    meets = ttft <= rules.sla.ttft_s and itl <= rules.sla.itl_s
    out = Estimate(fleet, ttft, itl, fleet.workers * rules.bounds.gpus_per_worker, meets)
    if reserve is None:
        return out
    other = evaluate(fleet, reserve, perf, rules, calib)
    sla = rules.sla
    worse = min(out, other, key=lambda e: e.slack(sla.ttft_s, sla.itl_s))
    return dataclasses.replace(worse, meets=out.meets and other.meets)


def reserve_load(load: Load, rules: Rules, baseline: float, shape: Load | None) -> Load | None:
    """The burst reserve as a load of its own: burst_ratio x the baseline rate, in the baseline's
    request shape (`shape`, pooled over the baseline's intervals); None without a shape or a
    reserve (then planned_load folds the reserve into the predicted load's rate)."""
    if shape is None or rules.burst_ratio <= 0 or baseline <= 0:
        return None
    return dataclasses.replace(shape, rate=baseline * rules.burst_ratio)


def choose(load: Load, perf: PerfModel, rules: Rules, calib: Calibration | None = None,
           mode: str | None = None, baseline: float = 0.0, held: int = 0,
           shape: Load | None = None) -> tuple[Estimate, tuple[Estimate, ...]]:
    """The cheapest shape meeting the SLA (ties: most slack); else the biggest allowed. With the
    baseline's request `shape`, the burst reserve is a second load every option must meet
    (reserve_load); without it, the reserve raises the predicted load's rate (planned_load)."""
    calib = calib or Calibration()
    reserve = reserve_load(load, rules, baseline, shape)
    planned = planned_load(load, rules, 0.0 if reserve else baseline, held)
    options = [evaluate(f, planned, perf, rules, calib, reserve) for f in _shapes(rules, mode or rules.mode)]
    if not options:
        raise ValueError(f"no fleet shape fits the bounds {rules.bounds}")
    sla = rules.sla
    meeting = [o for o in options if o.meets]
    if meeting:
        best = min(meeting, key=lambda o: (o.gpus, -o.slack(sla.ttft_s, sla.itl_s)))
    else:
        best = max(options, key=lambda o: (o.slack(sla.ttft_s, sla.itl_s), o.gpus))
    ranked = sorted(options, key=lambda o: (not o.meets, o.gpus, -o.slack(sla.ttft_s, sla.itl_s)))
    return best, tuple(ranked[:5])


def _step_down(current: Fleet, target: Fleet, step: int) -> Fleet:
    if current.disaggregated != target.disaggregated:
        return target  # a change of mode is taken whole (cooldown and votes still apply)
    return Fleet(*(min(c, max(t, c - step)) for c, t in zip(dataclasses.astuple(current),
                                                    dataclasses.astuple(target), strict=True)))


def plan_step(state: PlanState, now: float, predicted: Load | None, perf: PerfModel, rules: Rules,
              calib: Calibration | None = None, baseline: float = 0.0, held: int = 0,
              shape: Load | None = None) -> tuple[Decision, PlanState]:
    """Decide this interval's target fleet and the planner's next state (baseline, held: see
    planned_load; shape: choose)."""
    calib = calib or Calibration()
    fleet = state.fleet
    if predicted is None:
        reason = "no fresh metrics: holding the current fleet (never scaling down blind)"
        held = dataclasses.replace(state, down_votes=0, down_to=None)
        return Decision(now, "hold", fleet, fleet, reason), held
    best, options = choose(predicted, perf, rules, calib, baseline=baseline, held=held, shape=shape)
    reserve = reserve_load(predicted, rules, baseline, shape)
    planned = planned_load(predicted, rules, 0.0 if reserve else baseline, held)
    current = evaluate(fleet, planned, perf, rules, calib, reserve)
    common = {"predicted": predicted, "planned": planned, "reserve": reserve, "chosen": best,
              "current": current, "options": options}
    if best.fleet == fleet:
        why = "the current fleet is the cheapest that meets the SLA" if best.meets else \
            "no fleet within the bounds meets the SLA; this is the closest"
        return Decision(now, "hold", fleet, fleet, why, **common), PlanState(fleet, state.last_change_s)
    if best.gpus > current.gpus or not current.meets:
        action = "scale_up" if best.gpus > current.gpus else "resplit"
        verdict = "misses" if not current.meets else "meets"
        why = (f"{fleet} predicts TTFT {current.ttft_s:.3f}s ITL {current.itl_s * 1e3:.1f}ms: "
               f"{verdict} the SLA; {best.fleet} is the cheapest that meets it")
        return Decision(now, action, fleet, best.fleet, why, **common), PlanState(best.fleet, now)
    votes = state.down_votes + 1
    floor = _larger(state.down_to, best.fleet)
    waited = now - state.last_change_s
    if votes < rules.scale_down_intervals or waited < rules.cooldown_s:
        why = (f"{best.fleet} would meet the SLA at lower cost; waiting ({votes}/"
               f"{rules.scale_down_intervals} intervals, {min(waited, rules.cooldown_s):.0f}/"
               f"{rules.cooldown_s:.0f}s cool-down)")
        held = PlanState(fleet, state.last_change_s, votes, floor)
        return Decision(now, "hold", fleet, fleet, why, **common), held
    target = _step_down(fleet, floor, rules.max_scale_down_step)
    if target == fleet:  # the intervals agreed only on a different split: take the latest
        target = _step_down(fleet, best.fleet, rules.max_scale_down_step)
    action = "scale_down" if target.workers < fleet.workers else "resplit"
    why = (f"{best.fleet} meets the SLA with the full predicted load ({floor} the largest wanted "
           f"over the last {votes} intervals); moving to {target}")
    return Decision(now, action, fleet, target, why, **common), PlanState(target, now)
