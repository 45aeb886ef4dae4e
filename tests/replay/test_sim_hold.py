"""The simulator routes through the router's hold when a busy threshold is set: the same
HoldQueue, busy test and load booking as the frontend's router, on the virtual clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvflow.engines.mocker.timing import TimingModel, TimingParams
from kvflow.replay.sim import SimEngine, Simulation
from kvflow.replay.trace import TraceRequest
from kvflow.router.config import KvRouterConfig

SLOW = TimingParams(hbm_bandwidth=1.0e12, matmul_flops=2.0e14, attn_flops=1.3e14)
STARTUP = 1.0


def _sim(trace: list[TraceRequest], workers: int, **router: object) -> Simulation:
    config = KvRouterConfig(**router)  # type: ignore[arg-type]
    return Simulation(trace, workers=workers, timing=TimingModel(SLOW),
                      engine=SimEngine(startup_s=STARTUP), router=config)


def _burst(n: int, output: int = 500) -> list[TraceRequest]:
    """n requests 1 ms apart; 500 output tokens keep a worker busy for several seconds."""
    return [TraceRequest(i * 0.001, 64, output) for i in range(n)]


def test_held_requests_go_in_arrival_order_to_a_worker_that_joins() -> None:
    trace = _burst(6)
    sim = _sim(trace, 1, max_active_requests=2)
    sim.set_workers(2)  # asked at t=0: the second worker serves from t=1
    sim.advance(0.5)
    # Worker 0 took r0 and r1; r2..r5 wait at the router, not in worker 0's queue.
    assert sim.held() == 4 and len(sim.workers[0].scheduler.waiting) == 0
    assert {sim._load.worker_of(f"r{i}") for i in range(2)} == {0}
    sim.advance(STARTUP + 0.001)
    # The joining worker takes the next two in arrival order; r4, r5 still wait.
    assert [sim._load.worker_of(f"r{i}") for i in range(6)] == [0, 0, 1, 1, None, None]
    assert sim.held() == 2
    sim.advance()
    assert len(sim.results) == 6 and not any(r.error for r in sim.results)
    r4 = next(r for r in sim.results if r.arrival_s == trace[4].arrival_s)
    r0 = next(r for r in sim.results if r.arrival_s == 0.0)
    assert r4.ttft_s > r0.ttft_s + 1.0  # it waited at the router for a worker to free


def test_without_a_busy_threshold_requests_queue_on_the_worker_as_before() -> None:
    sim = Simulation(_burst(6), workers=1, timing=TimingModel(SLOW),
                     engine=SimEngine(startup_s=STARTUP), router=KvRouterConfig())
    sim.set_workers(2)
    sim.advance(STARTUP + 0.001)
    assert sim.hold is None and sim.held() == 0
    assert len(sim.workers[0].scheduler.running) + len(sim.workers[0].scheduler.waiting) == 6


def test_a_request_held_too_long_fails_with_the_router_s_error() -> None:
    sim = _sim(_burst(2), 1, max_active_requests=1, queue_timeout_s=0.5)
    result = sim.run()
    errors = [r.error for r in result.results if r.error]
    assert errors == ["all workers stayed busy for 0.5 s while this request waited; "
                      "retry after 1 s or add workers"]
    assert len(result.results) == 2


def test_prefill_token_threshold_holds_until_the_prompt_s_first_token() -> None:
    # 4096-token prompts, threshold 4096: the worker is busy until r0's first token.
    trace = [TraceRequest(i * 0.001, 4096, 20) for i in range(3)]
    sim = _sim(trace, 1, max_prefill_tokens=4096)
    sim.advance(0.0025)
    assert sim.held() == 2 and sim._load.load(0).prefill_tokens == 4096
    sim.advance()
    assert len(sim.results) == 3 and not any(r.error for r in sim.results)
    first = sorted(sim.results, key=lambda r: r.arrival_s)
    # r1 could start only after r0's first token: its TTFT exceeds r0's prefill.
    assert first[1].ttft_s + trace[1].arrival_s > first[0].ttft_s


def test_a_fork_with_held_requests_runs_on_independently() -> None:
    trace = _burst(6)
    sim = _sim(trace, 1, max_active_requests=2)
    sim.advance(0.5)
    copy = sim.fork()
    copy.set_workers(3)
    copy.advance()
    sim.advance()
    assert len(sim.results) == len(copy.results) == 6
    assert sim.held() == copy.held() == 0
    # The copy's extra workers took held requests: they finished sooner than on one worker.
    assert copy.result().end_s < sim.result().end_s


def test_kvflow_replay_simulate_takes_the_router_s_busy_thresholds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvflow.cli.replay import main

    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(f'{{"arrival_s": {i * 0.001}, "isl": 64, "osl": 20}}\n' for i in range(4)))
    assert main([str(trace), "--simulate", "--router-max-active-requests", "1", "--json"]) == 0
    assert "requests 4 failed 0" in capsys.readouterr().err
    assert main([str(trace), "--simulate", "--router-max-prefill-tokens", "0"]) == 2
    assert "max_prefill_tokens=0 is invalid" in capsys.readouterr().err
