"""Tracing: one request through real frontend and worker processes is one correctly nested trace."""

from __future__ import annotations

import logging
import os

import openai
import pytest

from kvflow.runtime import tracing
from kvflow.runtime.config import RuntimeConfig

pytest.importorskip("opentelemetry.sdk", reason="tracing needs the `tracing` extra")
pytest.importorskip("opentelemetry.proto", reason="the receiver needs opentelemetry-proto")

from kvflow.testing.otlp import OtlpReceiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"

FRONTEND = {tracing.SPAN_REQUEST, tracing.SPAN_PARSE, tracing.SPAN_QUEUE, tracing.SPAN_TOKENIZE,
            tracing.SPAN_ROUTE, tracing.SPAN_ATTEMPT}
WORKER = {tracing.SPAN_WORKER, tracing.SPAN_PREFILL, tracing.SPAN_DECODE}


async def test_one_request_is_one_trace_across_frontend_and_worker(stack, model_dir) -> None:
    with OtlpReceiver() as receiver:
        stack.env["KVFLOW_OTLP_ENDPOINT"] = receiver.endpoint
        base = stack.frontend()
        stack.mocker(model_dir, "--num-workers", "2")
        await stack.wait_workers(base, "m", 2)
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
        out = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "trace me"}], max_tokens=4,
            extra_headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
        await client.close()
        assert out.choices[0].finish_reason == "length"
        spans = receiver.wait_for(FRONTEND | WORKER)

    mine = [s for s in spans if s.trace_id == TRACE_ID]
    by_name = {s.name: s for s in mine}
    assert set(by_name) == FRONTEND | WORKER, sorted(s.name for s in spans)
    request, attempt, worker = (by_name[n] for n in (tracing.SPAN_REQUEST, tracing.SPAN_ATTEMPT,
                                                      tracing.SPAN_WORKER))
    # The client's span is the root's parent; everything else nests below the request.
    assert request.parent_span_id == CLIENT_SPAN
    for name in (tracing.SPAN_PARSE, tracing.SPAN_QUEUE, tracing.SPAN_TOKENIZE, tracing.SPAN_ROUTE,
                 tracing.SPAN_ATTEMPT):
        assert by_name[name].parent_span_id == request.span_id, name
    assert worker.parent_span_id == attempt.span_id  # across the process boundary
    for name in (tracing.SPAN_PREFILL, tracing.SPAN_DECODE):
        assert by_name[name].parent_span_id == worker.span_id, name
    # Two processes, two services; children inside their parents in time.
    assert {s.service for s in mine if s.name in FRONTEND} == {"kvflow-frontend"}
    assert {s.service for s in mine if s.name in WORKER} == {"kvflow-worker"}
    assert request.start_ns <= attempt.start_ns <= attempt.end_ns <= request.end_ns
    prefill, decode = by_name[tracing.SPAN_PREFILL], by_name[tracing.SPAN_DECODE]
    assert worker.start_ns <= prefill.start_ns <= prefill.end_ns <= decode.start_ns <= worker.end_ns
    # The routing decision: chosen worker and its candidates with overlap and cost.
    route = by_name[tracing.SPAN_ROUTE]
    assert route.attributes["kvflow.worker_id"] == attempt.attributes["kvflow.worker_id"]
    assert route.attributes["kvflow.worker_id"] == worker.attributes["kvflow.worker_id"]
    candidates = route.attributes["kvflow.candidates"]
    assert len(candidates) == 2 and all("overlap=" in c and "cost=" in c for c in candidates)
    assert decode.attributes["kvflow.output_tokens"] == 4
    assert request.attributes["kvflow.completion_tokens"] == 4


async def test_timing_field_and_debug_line_without_opentelemetry(stack, model_dir) -> None:
    stack.env["KVFLOW_LOG_LEVEL"] = "kvflow.frontend.timing=DEBUG"
    base = stack.frontend()
    stack.mocker(model_dir)
    await stack.wait_workers(base, "m", 1)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    plain = await client.completions.create(model="m", prompt="no timing", max_tokens=2)
    assert "kvflow_timing" not in (plain.model_extra or {})
    timed = await client.completions.create(model="m", prompt="time me", max_tokens=3,
                                            extra_headers={"x-kvflow-timing": "1"})
    split = timed.model_extra["kvflow_timing"]
    assert split["completion_tokens"] == 3 and split["attempts"] == 1 and split["worker"]
    assert 0 < split["ttft_ms"] <= split["total_ms"] and split["route_ms"] > 0
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "stream"}], max_tokens=2, stream=True,
        extra_headers={"x-kvflow-timing": "1"})
    extras = [c.model_extra.get("kvflow_timing") async for c in stream]
    assert extras[-1] is not None and extras[-1]["completion_tokens"] == 2
    await client.close()
    frontend = stack.procs[0]
    frontend.wait_for_output("completions success: parse=", timeout=10)
    assert "worker=" in frontend.output() and "ttft=" in frontend.output()


def test_tracing_is_off_without_an_endpoint() -> None:
    config = RuntimeConfig(discovery="memory")
    assert tracing.resolve_endpoint(config, env={}) == ""
    assert tracing.resolve_endpoint(config, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert not tracing.resolve_endpoint(config, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x",
                                                     "OTEL_SDK_DISABLED": "true"})
    assert tracing.setup_tracing(config, "test") is (bool(os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")) or bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")))
    tracing.shutdown_tracing()
    assert tracing.tracer() is None
    logging.getLogger(__name__).debug("ok")


def test_nothing_of_opentelemetry_is_imported_when_off() -> None:
    import subprocess
    import sys

    code = ("import sys, kvflow.cli.frontend, kvflow.engines.worker, kvflow.frontend.timeline;"
            "from kvflow.runtime import tracing; from kvflow.runtime.config import RuntimeConfig;"
            "assert not tracing.setup_tracing(RuntimeConfig(discovery='memory'), 'x');"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "KVFLOW_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _running(port: int) -> float:
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r"^kvflow_worker_running_requests\{[^}]*\} (\S+)$",
                                            text, re.MULTILINE))


async def test_a_migrated_request_is_one_trace_with_two_attempts(stack, model_dir) -> None:
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    with OtlpReceiver() as receiver:
        stack.env["KVFLOW_OTLP_ENDPOINT"] = receiver.endpoint
        base = stack.frontend()
        procs = [stack.mocker(model_dir, "--system-port", str(p), "--speedup-ratio", "1")
                 for p in ports]
        await stack.wait_workers(base, "m", 2)
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
        stream = await client.completions.create(
            model="m", prompt="move me", max_tokens=160, temperature=0, stream=True,
            extra_headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
        chunks, killed, finish = 0, None, None
        async for chunk in stream:
            chunks += 1
            finish = chunk.choices[0].finish_reason or finish
            if chunks == 30 and killed is None:
                busy = [i for i, p in enumerate(ports) if _running(p) > 0]
                assert len(busy) == 1
                killed = busy[0]
                procs[killed].kill()
        await client.close()
        assert killed is not None and finish == "length"
        receiver.wait_for({tracing.SPAN_REQUEST, tracing.SPAN_WORKER, tracing.SPAN_DECODE})
        spans = [s for s in receiver.spans if s.trace_id == TRACE_ID]

    request = next(s for s in spans if s.name == tracing.SPAN_REQUEST)
    attempts = sorted((s for s in spans if s.name == tracing.SPAN_ATTEMPT),
                      key=lambda s: s.attributes["kvflow.attempt"])
    assert [a.attributes["kvflow.attempt"] for a in attempts] == [1, 2]
    assert all(a.parent_span_id == request.span_id for a in attempts)
    assert attempts[0].error and not attempts[1].error  # the first worker was lost
    assert attempts[0].attributes["kvflow.worker_id"] != attempts[1].attributes["kvflow.worker_id"]
    routes = [s for s in spans if s.name == tracing.SPAN_ROUTE]
    assert len(routes) == 2 and request.attributes["kvflow.attempts"] == 2
    survivor = [s for s in spans if s.name == tracing.SPAN_WORKER
                and s.parent_span_id == attempts[1].span_id]
    assert len(survivor) == 1
