"""Draining: new streams are refused (and round robin retries elsewhere); timeouts are typed."""

from __future__ import annotations

import asyncio

import pytest

from kvflow.runtime import (
    DistributedRuntime,
    RuntimeConfig,
    StreamTimeoutError,
    WorkerShuttingDownError,
)


async def _slow(request: dict, context):
    for i in range(request["n"]):
        await asyncio.sleep(request.get("delay", 0.0))
        yield i
        if i + 1 == request.get("stall_after"):
            await asyncio.sleep(5)


def _cfg(**kw) -> RuntimeConfig:
    return RuntimeConfig(discovery="memory", event_plane="inproc", **kw)


async def test_draining_worker_refuses_new_streams_and_finishes_old() -> None:
    a, b = await DistributedRuntime(_cfg()).start(), await DistributedRuntime(_cfg()).start()
    caller = await DistributedRuntime(_cfg()).start()
    serving = [asyncio.ensure_future(rt.endpoint("drain.t.gen").serve(_slow)) for rt in (a, b)]
    client = await caller.endpoint("drain.t.gen").client()
    await client.wait_for_instances(timeout=5, count=2)
    in_flight = client.direct({"n": 20, "delay": 0.01}, a.lease_id)
    first = await in_flight.__anext__()
    # Hold a's entry in the client's view while a drains, as a slow watcher would.
    instances = dict(client.instances)
    shutdown = asyncio.ensure_future(a.shutdown())
    await asyncio.sleep(0.05)
    client.instances.update(instances)
    with pytest.raises(WorkerShuttingDownError):
        async for _ in client.direct({"n": 1}, a.lease_id):
            pass
    for _ in range(4):  # round robin skips the refusing instance
        assert [x async for x in client.round_robin({"n": 2})] == [0, 1]
    rest = [x async for x in in_flight]
    assert [first, *rest] == list(range(20))
    await shutdown
    for rt in (b, caller):
        await rt.shutdown()
    await asyncio.gather(*serving)


async def test_stream_timeout_is_typed() -> None:
    rt = await DistributedRuntime(_cfg(stream_timeout=0.2)).start()
    task = asyncio.ensure_future(rt.endpoint("drain.t.slow").serve(_slow))
    client = await rt.endpoint("drain.t.slow").client()
    await client.wait_for_instances(timeout=5)
    got = []
    with pytest.raises(StreamTimeoutError, match="after 1 responses"):
        async for x in client.round_robin({"n": 3, "stall_after": 1}):
            got.append(x)
    assert got == [0]
    await rt.shutdown()
    await task
