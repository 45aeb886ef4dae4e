"""Trace replay: reading traces, the virtual-clock simulation, and `kvflow replay` against a real stack."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.replay.report import RequestResult, attainment, windows
from kvflow.replay.sim import Simulation
from kvflow.replay.trace import (
    TraceError,
    TraceRequest,
    load_trace,
    prompt_tokens,
    synthetic_bursts,
    synthetic_day,
    without_bursts,
)
from kvflow.testing.procs import kvflow_proc, runtime_env
from kvflow.testing.tokenizer import make_model_dir


def test_reads_mooncake_lines_sorted_and_rebased(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"timestamp": 5000, "input_length": 700, "output_length": 3, "hash_ids": [1, 2]}\n'
                    '\n{"arrival_s": 2.0, "isl": 10, "osl": 4}\n')
    trace = load_trace(path, time_scale=2.0)
    assert [r.arrival_s for r in trace] == [0.0, 6.0]
    assert trace[1].hash_ids == (1, 2) and trace[1].input_length == 700


def test_a_bad_line_names_its_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 1, "input_length": 5, "output_length": 1}\n{"timestamp": 2}\n')
    with pytest.raises(TraceError, match=r"bad.jsonl:2: bad trace line"):
        load_trace(path)


def test_shared_hash_ids_give_shared_prompt_prefixes() -> None:
    a = prompt_tokens(TraceRequest(0, 1000, 1, (7, 8)), salt=1)
    b = prompt_tokens(TraceRequest(0, 1000, 1, (7, 9)), salt=2)
    assert len(a) == len(b) == 1000 and a[:512] == b[:512] and a[512:] != b[512:]


def test_synthetic_bursts_name_the_day_s_bursts_and_can_be_thinned_away() -> None:
    # A flat day of 20 req/s with one 60 s burst at 2.5x: 50 req/s inside it.
    day = synthetic_day(seed=5, day_s=600, mean_rate=20.0, peak_ratio=1.0, bursts=1, burst_s=60.0)
    ((start, end),) = synthetic_bursts(seed=5, day_s=600, bursts=1, burst_s=60.0)
    assert end - start == 60.0 and 60.0 <= start <= 540.0

    def inside(trace: list[TraceRequest]) -> int:
        return sum(start <= r.arrival_s < end for r in trace)
    assert 2600 < inside(day) < 3400  # 50 x 60 = 3000
    steady = without_bursts(day, [(start, end)], 2.5, seed=1)
    assert 1000 < inside(steady) < 1400  # 20 x 60 = 1200: the rate around it
    assert [r for r in steady if not start <= r.arrival_s < end] == \
        [r for r in day if not start <= r.arrival_s < end]  # outside the burst, untouched


def test_simulation_is_exact_and_repeatable() -> None:
    trace = synthetic_day(seed=3, day_s=30, mean_rate=1.0)
    one = Simulation(trace, workers=2).run()
    two = Simulation(trace, workers=2).run()
    assert [r.ttft_s for r in one.results] == [r.ttft_s for r in two.results]
    by_arrival = sorted(one.results, key=lambda r: r.arrival_s)
    assert [r.output_tokens for r in by_arrival] == [r.output_length for r in trace]
    assert one.worker_seconds == pytest.approx(2 * one.end_s)


def test_simulation_scales_workers_on_request_and_counts_worker_seconds() -> None:
    trace = [TraceRequest(float(i) / 4, 200, 20) for i in range(200)]  # 50 s at 4 req/s
    calls = []

    def controller(now, obs):
        calls.append(obs)
        return 3 if now < 20 else 1

    result = Simulation(trace, workers=1, interval_s=5.0, controller=controller).run()
    assert all(r.output_tokens == 20 for r in result.results)
    assert max(n for _, n in result.timeline) == 3 and result.timeline[-1][1] == 1
    assert result.end_s < result.worker_seconds < 3 * result.end_s
    assert calls[1].requests == 20 and calls[1].load.rate == pytest.approx(4.0)


def test_the_cached_fraction_counts_cached_and_prompt_tokens_of_the_same_finished_requests() -> None:
    # As the frontend counts them: both at a request's finish. A (t=0, 20 tokens) and B (t=0.5,
    # 300 tokens at ~6.4 ms) share the first 512-token hash block, so B's prefill takes A's 512
    # tokens from the cache; C (t=2.5, 10 tokens) shares nothing. A finishes in (0, 1], B and C
    # in (2, 3], where only C arrived: 512 / (1500 + 600) = 0.24381, not 512 / 600 (arrivals).
    # The prompt spread is the arrivals' (as their mean ISL): 1000 and 1500 in (0, 1] give
    # cv^2 = ((1000^2 + 1500^2) / 2) / 1250^2 - 1 = 0.04.
    trace = [TraceRequest(0.0, 1000, 20, (1,)), TraceRequest(0.5, 1500, 300, (1,)),
             TraceRequest(2.5, 600, 10, (2,))]
    seen = []
    result = Simulation(trace, workers=1, interval_s=1.0,
                        controller=lambda now, obs: seen.append(obs)).run()
    ends = sorted(r.arrival_s + r.ttft_s + r.itl_s * (r.output_tokens - 1) for r in result.results)
    assert ends[0] < 1.0 and 2.0 < ends[1] < ends[2] < 3.0
    assert [o.requests for o in seen[:3]] == [2, 0, 1]
    assert [o.load.cached_fraction for o in seen[:3]] == [0.0, 0.0, pytest.approx(512 / 2100)]
    assert [o.load.isl_cv2 for o in seen[:3]] == [pytest.approx(0.04), 0.0, 0.0]
    # Each finished request's own TTFT and ITL, as a point, for the calibration to pool.
    ordered = sorted(result.results, key=lambda r: r.arrival_s)
    assert seen[0].ttft_bins == ((ordered[0].ttft_s, ordered[0].ttft_s, 1.0),)
    assert sorted(b[0] for b in seen[2].itl_bins) == sorted(r.itl_s for r in ordered[1:])


def test_the_uncached_prompt_tokens_by_bucket_are_those_of_the_finished_requests() -> None:
    # A (600 tokens) and B (520, sharing A's first 512-token hash block, after A has finished)
    # compute 600 and 8 prompt tokens: A in (512, 1024] in the first interval, B in (4, 8] in
    # the third; none finishes in the second, which has no distribution.
    trace = [TraceRequest(0.0, 600, 5, (1,)), TraceRequest(2.1, 520, 5, (1,))]
    seen = []
    Simulation(trace, workers=1, interval_s=1.0, controller=lambda now, obs: seen.append(obs)).run()
    shares = [{e: s for e, s in o.load.uncached if s} for o in seen[:3]]
    assert shares == [{1024.0: 1.0}, {}, {8.0: 1.0}]
    assert [e for e, _ in seen[0].load.uncached][-2:] == [2.0**17, float("inf")]


def test_windows_and_attainment() -> None:
    results = [RequestResult(t, 0.1, 0.01, 10) for t in range(10)] + [
        RequestResult(65, 5.0, 0.01, 10), RequestResult(70, float("inf"), 0, 0, "boom")]
    stats = windows(results, 60, ttft_sla=1.0, itl_sla=0.04)
    assert [w.meets_sla for w in stats] == [True, False] and stats[1].errors == 1
    assert attainment(stats) == 0.5


def test_kvflow_replay_against_a_real_frontend(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "tiny")
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": i * 100, "input_length": 40 + i,
                                         "output_length": 5, "hash_ids": [1]}) + "\n" for i in range(12)))
    env = runtime_env(discovery="file", discovery_path=tmp_path / "d", lease_ttl=1.0)
    stack = kvflow_proc("run", "in=http", "out=mocker", "--model-path", str(model), "--model-name", "m",
                        "--http-port", "0", "--speedup-ratio", "10", env=env, log_dir=tmp_path / "logs")
    try:
        stack.wait_for_output("ready at", timeout=60)
        url = re.search(r"ready at (http://\S+)/v1", stack.output()).group(1)  # type: ignore[union-attr]
        done = subprocess.run([sys.executable, "-m", "kvflow.cli.main", "replay", str(trace), "--url", url,
                               "--window-s", "1", "--json"], capture_output=True, text=True, timeout=120,
                              env=env)
    finally:
        stack.stop()
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert sum(r["requests"] for r in rows) == 12 and all(r["errors"] == 0 for r in rows)
    assert "requests 12 failed 0" in done.stderr and "SLA attainment" in done.stderr
