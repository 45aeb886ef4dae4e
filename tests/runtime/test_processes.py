"""The runtime across real OS processes: routing, streams, death, drain, cancel."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

import pytest

from kvflow.runtime import (
    DistributedRuntime,
    RemoteError,
    WorkerUnavailableError,
)


async def _client(runtime: DistributedRuntime, count: int):
    ep = runtime.namespace(runtime.config.namespace).component("test").endpoint("generate")
    client = await ep.client()
    await client.wait_for_instances(timeout=30, count=count)
    return client


async def test_round_robin_direct_and_long_stream(cluster, runtime) -> None:
    cluster.start_worker()
    cluster.start_worker()
    client = await _client(runtime, 2)
    ids = client.instance_ids()
    seen = []
    for _ in range(6):
        seen += [x async for x in client.round_robin({"op": "whoami"})]
    assert set(seen) == set(ids)
    assert all(a != b for a, b in itertools.pairwise(seen)), f"round robin did not alternate: {seen}"
    for iid in ids:
        got = [x async for x in client.direct({"op": "whoami"}, iid)]
        assert got == [iid]
    items = [x async for x in client.round_robin({"op": "count", "n": 10_000})]
    assert items == list(range(10_000))
    await client.close()


async def test_remote_error_is_typed(file_cluster, file_runtime) -> None:
    file_cluster.start_worker()
    client = await _client(file_runtime, 1)
    got = []
    with pytest.raises(RemoteError) as info:
        async for x in client.round_robin({"op": "raise"}):
            got.append(x)
    assert got == ["before"]
    assert info.value.error_type == "ValueError" and "boom from handler" in str(info.value)


async def test_kill9_mid_stream(cluster, runtime) -> None:
    a = cluster.start_worker()
    b = cluster.start_worker()
    client = await _client(runtime, 2)
    victim_id = [x async for x in client.round_robin({"op": "whoami"})][0]
    victim, survivor = (a, b) if str(victim_id) in a.output() else (b, a)
    assert str(victim_id) in victim.output()
    stream = client.direct({"op": "count", "n": 1000, "delay": 0.01}, victim_id)
    received = 0
    with pytest.raises(WorkerUnavailableError) as info:
        async for _ in stream:
            received += 1
            if received == 5:
                victim.kill()
    assert info.value.responses_received == received >= 5
    assert f"after {received} responses" in str(info.value)
    # The survivor keeps serving, also through round robin right away.
    for _ in range(4):
        assert [x async for x in client.round_robin({"op": "count", "n": 3})] == [0, 1, 2]
    t0 = time.monotonic()
    while victim_id in client.instance_ids():
        assert time.monotonic() - t0 < 1.0 + 2.0, "dead instance still in discovery past its TTL"
        await asyncio.sleep(0.05)
    assert survivor.alive()


async def test_sigterm_drains_in_flight_stream(file_cluster, file_runtime) -> None:
    proc = file_cluster.start_worker()
    client = await _client(file_runtime, 1)
    stream = client.round_robin({"op": "count", "n": 100, "delay": 0.01})
    got = []
    async for x in stream:
        got.append(x)
        if len(got) == 3:
            proc.signal(signal.SIGTERM)
    assert got == list(range(100))
    # Deregistered before the process exited: gone from discovery while the
    # stream was still running (the SIGTERM came with 97 responses to go).
    assert client.instance_ids() == []
    assert await asyncio.to_thread(proc.popen.wait, 10) == 0
    assert "DRAINED" in proc.output()


async def test_client_break_stops_handler(file_cluster, file_runtime, tmp_path: Path) -> None:
    file_cluster.start_worker()
    client = await _client(file_runtime, 1)
    report = tmp_path / "stop-report"
    async for x in client.round_robin({"op": "watch_stop", "report": str(report)}):
        if x == 4:
            t_break = time.monotonic()
            break
    for _ in range(200):
        if report.exists() and report.read_text():
            break
        await asyncio.sleep(0.005)
    t_seen, stopped = report.read_text().split()
    assert stopped == "True"
    assert float(t_seen) - t_break < 0.1


async def test_task_cancel_stops_handler(file_cluster, file_runtime, tmp_path: Path) -> None:
    file_cluster.start_worker()
    client = await _client(file_runtime, 1)
    report = tmp_path / "stop-report"

    async def consume() -> None:
        async for _ in client.round_robin({"op": "watch_stop", "report": str(report)}):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    t_cancel = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if report.exists() and report.read_text():
            break
        await asyncio.sleep(0.005)
    t_seen, stopped = report.read_text().split()
    assert stopped == "True" and float(t_seen) - t_cancel < 0.1
