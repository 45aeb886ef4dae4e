"""The oracle: the fewest workers per window, found by search on the simulation, asked for start-up ahead."""

from __future__ import annotations

import pytest

from kvflow.engines.mocker.timing import TimingModel, TimingParams
from kvflow.replay.oracle import oracle_schedule, reactive_controller
from kvflow.replay.report import attainment, windows
from kvflow.replay.sim import SimEngine, Simulation
from kvflow.replay.trace import TraceRequest

SLOW = TimingParams(hbm_bandwidth=1.0e12, matmul_flops=2.0e14, attn_flops=1.3e14)  # ~6 req/s a worker
WINDOW, STARTUP, TTFT, ITL = 20.0, 5.0, 1.0, 0.04


def _trace() -> list[TraceRequest]:
    """1 req/s, then 12 req/s, then 1 req/s: one window each."""
    out: list[TraceRequest] = []
    for start, rate in ((0.0, 1), (WINDOW, 12), (2 * WINDOW, 1)):
        out += [TraceRequest(start + i / rate, 1000, 50) for i in range(int(WINDOW * rate))]
    return out


def _sim(trace: list[TraceRequest], n: int) -> Simulation:
    return Simulation(trace, workers=n, timing=TimingModel(SLOW), engine=SimEngine(startup_s=STARTUP))


def test_the_oracle_finds_the_fewest_workers_each_window_needs() -> None:
    trace = _trace()
    found = oracle_schedule(trace, lambda n: _sim(trace, n), window_s=WINDOW, ttft_sla=TTFT, itl_sla=ITL,
                            startup_s=STARTUP, max_workers=6)
    low, high, after = found.schedule
    assert low == 1 and high > 1 and after < high
    assert attainment(windows(found.result.results, WINDOW, TTFT, ITL)) == 1.0
    # One worker fewer in the busy window misses it; the oracle's size is the least that works.
    fewer = _sim(trace, high - 1).run()
    assert not windows(fewer.results, WINDOW, TTFT, ITL)[1].meets_sla
    # Workers for the busy window were asked for start-up ahead of it, and paid for from then.
    assert (WINDOW - STARTUP, high) in found.result.timeline
    fixed = _sim(trace, high).run()
    assert found.result.worker_seconds < fixed.worker_seconds


def test_the_oracle_needs_a_start_up_shorter_than_a_window() -> None:
    with pytest.raises(ValueError, match="startup_s < window_s"):
        oracle_schedule(_trace(), lambda n: _sim(_trace(), n), window_s=5.0, ttft_sla=TTFT, itl_sla=ITL,
                        startup_s=5.0, max_workers=2)


def test_a_fork_runs_on_independently() -> None:
    trace = _trace()
    sim = _sim(trace, 1)
    sim.advance(10.0)
    copy = sim.fork()
    copy.set_workers(3)
    copy.advance()
    sim.advance()
    assert len(sim.results) == len(copy.results) == len(trace)
    assert max(n for _, n in sim.timeline) == 1 and max(n for _, n in copy.timeline) == 3
    assert sim.result().worker_seconds < copy.result().worker_seconds


def test_the_reactive_yardstick_learns_of_a_burst_only_after_it_begins() -> None:
    # Windows of 60 s: steady sizes 1, 2, 1; the oracle's sizes 1, 4, 3 for a burst at 70..90 s.
    control = reactive_controller([1, 2, 1], [1, 4, 3], [(70.0, 90.0)], window_s=60.0, startup_s=10.0,
                                  detect_s=1.0)
    assert control(5.0) == 1
    assert control(50.0) == 2  # window 1's 2 workers are asked for 10 s ahead of it
    assert control(65.0) == 2  # the burst is 5 s away and unknown: no more than the steady size
    assert control(70.5) == 2  # it began 0.5 s ago: not yet detected
    assert control(71.0) == 4  # detected: window 1's burst size
    assert control(115.0) == 4  # window 2 is not one the burst touches: its size is not asked ahead
    assert control(120.0) == 1  # the burst's last window is over: back to the steady size
    with pytest.raises(ValueError, match="a burst size for every window"):
        reactive_controller([1, 2], [1], [], window_s=60.0, startup_s=10.0, detect_s=1.0)
