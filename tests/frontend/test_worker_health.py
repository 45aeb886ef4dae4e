"""Stall rules and worker avoidance, on their own: StallWatch.check, StallConfig, WorkerHealth."""

from __future__ import annotations

import time

import pytest

from kvflow.frontend.stalls import StallConfig, StallWatch
from kvflow.frontend.worker_health import Avoidance, WorkerHealth

CONFIG = StallConfig(timeout_s=2.0, first_output_s=5.0, prefill_s_per_token=0.01,
                     step_factor=10.0, gone_s=1.0)


class FakeStream:
    """What the sweeper reads of a ResponseStream: outputs consumed, consumer waiting."""

    def __init__(self) -> None:
        self.received = 0
        self.waiting = True


def _watch(prompt_tokens: int = 100) -> tuple[StallWatch, FakeStream, float]:
    w, s = StallWatch(7, prompt_tokens), FakeStream()
    w.attach(s)  # type: ignore[arg-type]
    return w, s, w.last_at


def test_first_output_gets_time_for_queueing_and_prefill() -> None:
    w, _, t0 = _watch(prompt_tokens=100)  # 5 s + 100 x 10 ms = 6 s
    assert w.check(CONFIG, True, t0 + 5.9) is None
    stall = w.check(CONFIG, True, t0 + 6.1)
    assert stall is not None and stall.kind == "silent"


def test_between_outputs_the_timeout_or_the_streams_own_pace() -> None:
    w, s, t0 = _watch()
    for i in range(1, 11):  # 10 outputs, 0.5 s apart: mean step 0.5 s -> 10 x 0.5 = 5 s
        s.received = i
        assert w.check(CONFIG, True, t0 + 0.5 * i) is None
    last = t0 + 5.0
    assert w.check(CONFIG, True, last + 4.9) is None
    assert w.check(CONFIG, True, last + 5.1) is not None
    fast, s2, t1 = _watch()
    for i in range(1, 11):  # a fast stream gets the 2 s floor
        s2.received = i
        fast.check(CONFIG, True, t1 + 0.01 * i)
    assert fast.check(CONFIG, True, t1 + 0.1 + 2.1) is not None


def test_a_busy_consumer_is_not_a_stalled_worker() -> None:
    w, s, t0 = _watch()
    s.waiting = False  # the client reads slowly; the worker is not to blame
    assert w.check(CONFIG, True, t0 + 60) is None
    s.waiting = True
    assert w.check(CONFIG, True, t0 + 61) is None  # the clock restarted when it waited


def test_gone_from_discovery_counts_only_while_silent() -> None:
    w, s, t0 = _watch()
    for i in range(1, 20):  # a draining worker: deregistered, still streaming
        s.received = i
        assert w.check(CONFIG, False, t0 + 0.5 * i) is None
    stall = w.check(CONFIG, False, t0 + 9.5 + 1.1)
    assert stall is not None and stall.kind == "gone"


def test_stall_config_checks_and_switch() -> None:
    assert not StallConfig(timeout_s=0).enabled and StallConfig().enabled
    with pytest.raises(ValueError, match="timeout_s"):
        StallConfig(timeout_s=-1)


def test_worker_health_lost_suspect_alive() -> None:
    h = WorkerHealth(Avoidance(down_s=60, suspect_s=60), proof_by_ping=True)
    h.lost(1)
    assert h.usable([1, 2, 3]) == [2, 3]
    assert h.usable([1]) == [1]  # only a lost one left: better than none
    h.suspect(2)
    assert h.usable([1, 2, 3]) == [3] and h.suspects() == [2]
    assert h.usable([2]) == []  # a suspect is never chosen
    assert h.usable([1, 2, 3], exclude={3}) == [1]
    h.forget([1, 3])  # 2 left discovery (lease expired): still suspect when it returns
    assert h.usable([1, 2, 3]) == [3]
    h.alive(2)
    h.alive(1)
    assert h.usable([1, 2, 3]) == [1, 2, 3]


def test_without_the_canary_a_suspect_clears_after_suspect_s() -> None:
    h = WorkerHealth(Avoidance(suspect_s=0.05), proof_by_ping=False)
    h.suspect(5)
    assert h.usable([5, 6]) == [6]
    time.sleep(0.06)
    assert h.usable([5, 6]) == [5, 6]
