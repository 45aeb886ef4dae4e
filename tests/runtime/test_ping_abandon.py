"""Request-plane canary pings and abandoning a stream from outside (stall detection)."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvflow.runtime import DistributedRuntime, RuntimeConfig, codec
from kvflow.runtime.component import Instance
from kvflow.runtime.errors import WorkerStalledError


def _cfg() -> RuntimeConfig:
    return RuntimeConfig(discovery="memory", event_plane="inproc")


class Silent(asyncio.Protocol):
    """Accepts a connection, reads everything, answers nothing."""

    def data_received(self, data: bytes) -> None:
        pass


async def test_ping_answers_for_a_live_worker_not_for_a_silent_one() -> None:
    worker = await DistributedRuntime(_cfg()).start()
    caller = await DistributedRuntime(_cfg()).start()

    async def gen(request: dict, context):
        yield 1

    serving = asyncio.ensure_future(worker.endpoint("ping.t.gen").serve(gen))
    silent = await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", 0)
    try:
        client = await caller.endpoint("ping.t.gen").client()
        await client.wait_for_instances(timeout=5)
        assert (await client.ping(worker.lease_id, 2.0)).answered
        assert (await client.ping(worker.lease_id, 2.0)).answered  # again, same connection
        fake = 0x5151
        port = silent.sockets[0].getsockname()[1]
        inst = Instance(fake, "ping", "t", "gen", "127.0.0.1", port)
        await caller.discovery.put(f"v1/instances/ping/t/gen/{fake:016x}", codec.encode(inst))
        await client.wait_for_instances(timeout=5, count=2)
        t0 = time.monotonic()
        assert await client.ping(fake, 0.3) == (False, "no answer within 0.3s")
        assert time.monotonic() - t0 < 2
        assert not (await client.ping(0x77, 0.3)).answered  # not registered
    finally:
        silent.close()
        await caller.shutdown()
        await worker.shutdown()
        serving.cancel()


async def test_abandon_ends_the_wait_and_cancels_on_the_worker() -> None:
    worker = await DistributedRuntime(_cfg()).start()
    caller = await DistributedRuntime(_cfg()).start()
    stopped = asyncio.Event()

    async def hang(request: dict, context):
        yield 1
        try:
            await asyncio.sleep(60)  # a hung engine
            yield 2
        finally:
            stopped.set()

    serving = asyncio.ensure_future(worker.endpoint("ab.t.gen").serve(hang))
    try:
        client = await caller.endpoint("ab.t.gen").client()
        await client.wait_for_instances(timeout=5)
        stream = client.direct({}, worker.lease_id)
        assert await stream.__anext__() == 1
        waiting = asyncio.ensure_future(stream.__anext__())
        while not stream.waiting:
            await asyncio.sleep(0.01)
        stream.abandon(WorkerStalledError("worker stalled", instance_id=worker.lease_id))
        with pytest.raises(WorkerStalledError, match="stalled"):
            await waiting
        await asyncio.wait_for(stopped.wait(), 5)  # CANCEL reached the handler
    finally:
        await caller.shutdown()
        await worker.shutdown()
        serving.cancel()
