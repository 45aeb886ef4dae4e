"""The cheapest fleet schedule for a known trace, found by search on the simulation: the planner's yardstick.

The schedule holds a constant number of serving workers through each SLA window.
Window by window, in time order, it tries fleet sizes on forks of the simulation and
keeps the smallest under which that window meets the SLA, and the window before it
(whose last requests are still running) still does. It knows the trace, so the
workers a window needs are asked for `startup_s` before it starts and paid for while
they start; workers it no longer needs drain from the window's start.

Greedy in time is not a proof of the global minimum (a smaller fleet now could leave a
backlog that costs more later), but each window's size is the least that works given
the past, measured by the same simulator the planner is judged by, not by the
planner's model. It is a lower bound for any planner that changes the fleet only at
window boundaries; a planner that moves more often can beat it.

`reactive_controller` is the yardstick for a causal planner: one that knows the traffic
ahead except when a burst begins. It holds given per-window sizes (asked for start-up
ahead, as the oracle does) and learns of each burst `detect_s` after it begins; from
then to the end of the last window the burst touches it holds at least the sizes given
for the burst (e.g. the oracle's), while the workers it asks for start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from kvflow.planner.observe import Observation
from kvflow.replay.report import RequestResult, meets_sla
from kvflow.replay.sim import SimResult, Simulation
from kvflow.replay.trace import TraceRequest

CHECK_EVERY_S = 5.0  # virtual seconds between checks of a trial (early exit on a sure miss)


@dataclass(frozen=True)
class OracleResult:
    schedule: list[int]  # serving workers per window
    result: SimResult
    trials: int


@dataclass(frozen=True)
class _Sla:
    window_s: float
    ttft_s: float
    itl_s: float


def _allowed_misses(n: int) -> int:
    """How many of n values may exceed the target while the p90 still meets it."""
    return n - math.ceil(0.9 * n) if n else 0


class _Search:
    def __init__(self, trace: list[TraceRequest], sla: _Sla, startup_s: float) -> None:
        self.sla, self.startup_s = sla, startup_s
        self.windows = int(trace[-1].arrival_s // sla.window_s) + 1 if trace else 0
        self.arrivals = [0] * self.windows
        self.with_itl = [0] * self.windows
        for r in trace:
            k = self._window(r.arrival_s)
            self.arrivals[k] += 1
            self.with_itl[k] += r.output_length > 1
        self.trials = 0

    def _window(self, t: float) -> int:
        return int(t // self.sla.window_s)

    def group(self, sim: Simulation, k: int) -> list[RequestResult]:
        return [r for r in sim.results if self._window(r.arrival_s) == k]

    def apply(self, sim: Simulation, k: int, n: int) -> None:
        """Serve window k with n workers: grow startup_s ahead of it, shrink at its start."""
        if n > sim.active_workers:
            sim.set_workers(n)
        sim.advance(k * self.sla.window_s)
        if n < sim.active_workers:
            sim.set_workers(n)

    def trial(self, base: Simulation, k: int, n: int, check_previous: bool) -> bool:
        self.trials += 1
        sim = base.fork()
        self.apply(sim, k, n)
        seen = len(sim.results)
        done = 0
        bad_ttft = bad_itl = 0
        limit = (k + 2) * self.sla.window_s
        while done < self.arrivals[k]:
            if sim.done or sim.now >= limit:
                return False
            sim.advance(sim.now + CHECK_EVERY_S)
            for r in sim.results[seen:]:
                if self._window(r.arrival_s) != k:
                    continue
                done += 1
                if r.error:
                    return False
                bad_ttft += r.ttft_s > self.sla.ttft_s
                bad_itl += r.output_tokens > 1 and r.itl_s > self.sla.itl_s
            seen = len(sim.results)
            if bad_ttft > _allowed_misses(self.arrivals[k]) or bad_itl > _allowed_misses(self.with_itl[k]):
                return False
        if not meets_sla(self.group(sim, k), self.sla.ttft_s, self.sla.itl_s):
            return False
        if check_previous and k > 0:
            while len(self.group(sim, k - 1)) < self.arrivals[k - 1] and not sim.done:
                sim.advance(sim.now + CHECK_EVERY_S)
            return meets_sla(self.group(sim, k - 1), self.sla.ttft_s, self.sla.itl_s)
        return True


def _smallest(ok: Callable[[int], bool], start: int, top: int) -> tuple[int, bool]:
    """The smallest n in 1..top with ok(n), searching from start (ok is monotone enough); else top."""
    n = start
    if ok(n):
        while n > 1 and ok(n - 1):
            n -= 1
        return n, True
    while n < top:
        n += 1
        if ok(n):
            return n, True
    return top, False


def oracle_schedule(trace: list[TraceRequest], make_sim: Callable[[int], Simulation], *,
                    window_s: float, ttft_sla: float, itl_sla: float, startup_s: float,
                    max_workers: int) -> OracleResult:
    """The greedy least-workers-per-window schedule; `make_sim(n)` starts with n ready workers."""
    if not 0 <= startup_s < window_s:
        raise ValueError(f"the oracle needs 0 <= startup_s < window_s; got {startup_s} and {window_s}")
    search = _Search(trace, _Sla(window_s, ttft_sla, itl_sla), startup_s)
    schedule: list[int] = []
    base: Simulation | None = None
    previous_ok = False
    for k in range(search.windows):
        if base is None:
            n, previous_ok = _smallest(lambda n: search.trial(make_sim(n), 0, n, False), 1, max_workers)
            base = make_sim(n)
        else:
            n, previous_ok = _smallest(lambda n, s=base, k=k, c=previous_ok: search.trial(s, k, n, c),
                                       schedule[-1], max_workers)
            search.apply(base, k, n)
        schedule.append(n)
        base.advance((k + 1) * window_s - startup_s if k + 1 < search.windows else float("inf"))
    if base is None:
        base = make_sim(1)
        base.advance()
    return OracleResult(schedule, base.result(), search.trials)


def reactive_controller(steady: list[int], burst_sizes: list[int], bursts: list[tuple[float, float]], *,
                        window_s: float, startup_s: float,
                        detect_s: float) -> Callable[[float, Observation | None], int]:
    """A simulation controller: per window `steady[k]` workers, asked for `startup_s` ahead of the
    window (and let go at its start); from `detect_s` after a burst (start, end) begins until the
    end of the last window it touches, at least `burst_sizes` of the window (of the next one too,
    startup_s ahead, while that is still one the burst touches)."""
    if not steady or len(burst_sizes) < len(steady):
        raise ValueError("reactive_controller needs a steady size and a burst size for every window")
    last = len(steady) - 1
    # (when the burst is known, the last window it touches)
    spans = [(start + detect_s, math.ceil(end / window_s) - 1) for start, end in bursts]

    def control(now: float, _: Observation | None = None) -> int:
        k = min(int(now // window_s), last)
        ahead = min(int((now + startup_s) // window_s), last)
        n = max(steady[k], steady[ahead])
        for known, final in spans:
            if known <= now < (final + 1) * window_s:
                n = max(n, burst_sizes[k], burst_sizes[ahead] if ahead <= final else 0)
        return n
    return control
