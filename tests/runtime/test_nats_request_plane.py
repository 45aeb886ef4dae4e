"""NATS request plane against a real nats-server: streams, cancel, errors, failover, liveness."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest

from kvflow.runtime import DistributedRuntime, RuntimeConfig, codec
from kvflow.runtime.codec import FrameKind
from kvflow.runtime.component import Instance
from kvflow.runtime.context import Context
from kvflow.runtime.errors import (
    ProtocolVersionError,
    RemoteError,
    WorkerShuttingDownError,
    WorkerUnavailableError,
)
from kvflow.runtime.request_plane.nats import NatsRequestPlane, instance_subject, parse_frame
from kvflow.runtime.request_plane.tcp_server import ServedEndpoint
from kvflow.testing.servers import EtcdServer, NatsServer


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


def config(nats: NatsServer, **overrides: object) -> RuntimeConfig:
    settings: dict = {"namespace": "t" + uuid.uuid4().hex[:8], "discovery": "memory",
                      "event_plane": "inproc", "request_plane": "nats", "nats_url": nats.url,
                      "graceful_shutdown_timeout": 5.0}
    return RuntimeConfig(**{**settings, **overrides})


async def counter(request: dict, ctx: Context) -> AsyncIterator[int]:
    for i in range(request["n"]):
        yield i
    if request.get("fail"):
        raise ValueError("asked to fail")


class Cluster:
    """A worker runtime serving `handler` on ns.worker.generate, and a caller runtime."""

    def __init__(self, cfg: RuntimeConfig, handler: object = counter) -> None:
        self.cfg, self.handler = cfg, handler
        self.path = f"{cfg.namespace}.worker.generate"

    async def __aenter__(self) -> Cluster:
        self.worker = await DistributedRuntime(self.cfg).start()
        self.caller = await DistributedRuntime(self.cfg).start()
        self.serving = asyncio.ensure_future(self.worker.endpoint(self.path).serve(self.handler))
        self.client = await self.caller.endpoint(self.path).client()
        await self.client.wait_for_instances(timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.caller.shutdown()
        await self.worker.shutdown()
        await self.serving


async def test_streamed_call_over_nats_with_etcd_discovery(etcd_server: EtcdServer,
                                                           nats_server: NatsServer) -> None:
    cfg = config(nats_server, discovery="etcd", etcd_endpoints=etcd_server.endpoints, lease_ttl=1.0)
    async with Cluster(cfg) as c:
        (inst,) = c.client.instances.values()
        assert inst.transport == "nats"
        assert [x async for x in c.client.round_robin({"n": 2000})] == list(range(2000))
        results = await asyncio.gather(*[_collect(c.client.round_robin({"n": 50})) for _ in range(20)])
        assert all(r == list(range(50)) for r in results)


async def _collect(stream: object) -> list:
    return [x async for x in stream]  # type: ignore[attr-defined]


async def test_cancel_reaches_the_handler(nats_server: NatsServer) -> None:
    stopped = asyncio.Event()
    closed = asyncio.Event()

    async def forever(request: dict, ctx: Context) -> AsyncIterator[int]:
        try:
            i = 0
            while not ctx.is_stopped():
                yield i
                i += 1
                await asyncio.sleep(0.01)
            stopped.set()
        finally:
            closed.set()

    async with Cluster(config(nats_server), forever) as c:
        ctx = Context()
        got = []
        async for item in c.client.round_robin({}, ctx):
            got.append(item)
            if len(got) == 3:
                ctx.stop_generating()
        assert got[:3] == [0, 1, 2]
        await asyncio.wait_for(closed.wait(), 2)
        assert stopped.is_set(), "the handler's context never saw the stop"


async def test_handler_error_reaches_the_caller(nats_server: NatsServer) -> None:
    async with Cluster(config(nats_server)) as c:
        got = []
        with pytest.raises(RemoteError, match="asked to fail") as info:
            async for item in c.client.round_robin({"n": 2, "fail": True}):
                got.append(item)
        assert got == [0, 1]
        assert info.value.error_type == "ValueError"


async def test_unserved_instance_fails_over_to_a_live_one(nats_server: NatsServer) -> None:
    async with Cluster(config(nats_server)) as c:
        ns, comp, ep = c.path.split(".")
        ghost = Instance(0xDEAD, ns, comp, ep, "127.0.0.1", 1, "nats")  # registered, never served
        await c.caller.discovery.put(f"{c.caller.endpoint(c.path).discovery_prefix}{0xDEAD:016x}",
                                     codec.encode(ghost))
        await c.client.wait_for_instances(timeout=5, count=2)
        with pytest.raises(WorkerUnavailableError, match="no worker is serving"):
            await _collect(c.client.direct({"n": 1}, 0xDEAD))
        for _ in range(4):  # round robin hits the ghost, gets "no responders", retries the live one
            assert await _collect(c.client.round_robin({"n": 3})) == [0, 1, 2]


class Sink:
    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.ended = False
        self.error: Exception | None = None
        self.done = asyncio.Event()
        self.arrived = asyncio.Event()

    def on_data(self, payload: bytes) -> None:
        self.items.append(payload)
        self.arrived.set()

    def on_end(self) -> None:
        self.ended = True
        self.done.set()

    def on_error(self, exc: Exception) -> None:
        self.error = exc
        self.done.set()


def request(endpoint: ServedEndpoint, body: dict) -> codec.RequestHeader:
    return codec.RequestHeader(endpoint.path, endpoint.instance_id, "r", msgspec.Raw(codec.encode(body)))


def served(handler: object, path: str = "ns.comp.ep", iid: int = 7) -> ServedEndpoint:
    s = ServedEndpoint(path, iid, handler, codec.decoder_for(None))  # type: ignore[arg-type]
    s.idle.set()
    return s


async def test_heartbeats_keep_slow_streams_and_silence_fails_dead_ones(nats_server: NatsServer) -> None:
    async def slow_then_hang(request: dict, ctx: Context) -> AsyncIterator[str]:
        await asyncio.sleep(request["delay"])  # several heartbeat periods with no output
        yield "late"
        await asyncio.sleep(3600)

    worker = await NatsRequestPlane(nats_server.url, heartbeat_s=0.1).start()
    caller = await NatsRequestPlane(nats_server.url, heartbeat_s=0.1).start()
    endpoint = served(slow_then_hang)
    await worker.serve(endpoint)
    sink = Sink()
    caller.open_stream(sink, request(endpoint, {"delay": 0.6}))
    await asyncio.wait_for(sink.arrived.wait(), 3)  # fails if the silence check killed the stream
    assert sink.error is None and codec.decode_any(sink.items[0]) == "late"
    await worker.close()  # the worker dies mid-stream: no END ever comes
    await asyncio.wait_for(sink.done.wait(), 2)
    assert isinstance(sink.error, WorkerUnavailableError) and "silent" in str(sink.error)
    await caller.close()


async def test_a_stall_of_the_callers_own_loop_is_not_blamed_on_the_worker(nats_server: NatsServer) -> None:
    async def answer_soon(request: dict, ctx: Context) -> AsyncIterator[str]:
        await asyncio.sleep(0.05)
        yield "ok"

    worker = await NatsRequestPlane(nats_server.url, heartbeat_s=0.1).start()
    caller = await NatsRequestPlane(nats_server.url, heartbeat_s=0.1).start()
    endpoint = served(answer_soon)
    await worker.serve(endpoint)
    sink = Sink()
    caller.open_stream(sink, request(endpoint, {}))
    time.sleep(0.8)  # the event loop is blocked for 8 heartbeats (a GC pause, a starved CPU)
    await asyncio.wait_for(sink.done.wait(), 3)
    assert sink.error is None and codec.decode_any(sink.items[0]) == "ok"
    await worker.close()
    await caller.close()


async def test_draining_instance_refuses_new_streams(nats_server: NatsServer) -> None:
    worker = await NatsRequestPlane(nats_server.url).start()
    caller = await NatsRequestPlane(nats_server.url).start()
    endpoint = served(counter)
    await worker.serve(endpoint)
    endpoint.draining = True
    sink = Sink()
    caller.open_stream(sink, request(endpoint, {"n": 1}))
    await asyncio.wait_for(sink.done.wait(), 2)
    assert isinstance(sink.error, WorkerShuttingDownError)
    await worker.unserve(endpoint)
    await worker.close()
    await caller.close()


def test_frames_carry_and_check_the_protocol_version() -> None:
    frame = parse_frame(codec.frame(FrameKind.DATA, 5, b"abc"))
    assert (frame.kind, frame.stream_id, frame.payload) == (FrameKind.DATA, 5, b"abc")
    alien = bytearray(codec.frame(FrameKind.DATA, 5, b"abc"))
    alien[4] = codec.PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolVersionError, match="protocol mismatch"):
        parse_frame(bytes(alien))
    assert instance_subject("ns.comp.ep", 0xAB) == "kvflow.rq.ns.comp.ep.00000000000000ab"
