"""Hostile bytes on the request plane, and protocol version mismatches."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from kvflow.runtime import DistributedRuntime, ProtocolVersionError, RuntimeConfig, codec
from kvflow.runtime.codec import FrameKind


async def _count(request: dict, context):
    for i in range(request["n"]):
        yield i


@pytest.fixture
async def served():
    rt = await DistributedRuntime(
        RuntimeConfig(discovery="memory", event_plane="inproc", max_frame_bytes=1 << 20)
    ).start()
    ep = rt.endpoint("wire.test.count")
    task = asyncio.ensure_future(ep.serve(_count))
    client = await ep.client()
    await client.wait_for_instances(timeout=5)
    server = await rt.tcp_server()
    yield rt, client, server.port
    await rt.shutdown()
    await task


async def _raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        got = await asyncio.wait_for(reader.read(), 3)
    finally:
        writer.close()
    return got


@pytest.mark.parametrize(
    "name,data",
    [
        ("garbage", b"\xff" * 64),
        ("oversize", struct.pack("!IBBQ", (1 << 20) + 100, codec.PROTOCOL_VERSION, 1, 1) + b"x" * 100),
        ("bad-kind", codec.frame(77, 1, b"")),
        ("bad-request-body", codec.frame(FrameKind.REQUEST, 1, b"\xc1\xc1\xc1")),
    ],
)
async def test_bad_frames_close_only_that_connection(served, caplog, name, data) -> None:
    rt, client, port = served
    caplog.set_level(logging.WARNING, logger="kvflow.runtime.request_plane.tcp_server")
    got = await _raw_exchange(port, data)  # returns when the server closes
    assert b"\x00" not in got[:0]  # the server closed the connection (read() returned)
    assert any("closing connection" in r.getMessage() for r in caplog.records), caplog.text
    assert [x async for x in client.round_robin({"n": 3})] == [0, 1, 2]


async def test_truncated_frame_then_disconnect(served) -> None:
    rt, client, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(codec.frame(FrameKind.REQUEST, 1, b"\x94" + b"\xa1a" * 3)[:-2])
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.05)
    assert [x async for x in client.round_robin({"n": 3})] == [0, 1, 2]


async def test_server_rejects_other_protocol_version(served) -> None:
    rt, client, port = served
    hello = codec.encode(codec.HelloMsg(99, "future"))
    frame = struct.pack("!IBBQ", codec.LENGTH_REST + len(hello), 99, FrameKind.HELLO, 0) + hello
    got = await _raw_exchange(port, frame)
    length, version, kind, _ = codec.HEADER.unpack_from(got)
    err = codec.decode_error(got[codec.HEADER_SIZE : 4 + length])
    assert kind == FrameKind.ERROR and version == codec.PROTOCOL_VERSION
    assert f"v{codec.PROTOCOL_VERSION}" in err.message and "v99" in err.message
    assert [x async for x in client.round_robin({"n": 2})] == [0, 1]


async def test_client_names_both_versions() -> None:
    async def fake_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        err = codec.encode(codec.ErrorMsg("x", "y", "remote"))
        writer.write(struct.pack("!IBBQ", codec.LENGTH_REST + len(err), 7, FrameKind.ERROR, 1) + err)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(fake_worker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rt = await DistributedRuntime(RuntimeConfig(discovery="memory", event_plane="inproc")).start()
    try:
        from kvflow.runtime.component import Instance

        ep = rt.endpoint("wire.fake.ep")
        inst = Instance(5, "wire", "fake", "ep", "127.0.0.1", port)
        await rt.discovery.put(f"{ep.discovery_prefix}{5:016x}", codec.encode(inst))
        client = await ep.client()
        await client.wait_for_instances(timeout=2)
        with pytest.raises(ProtocolVersionError) as info:
            async for _ in client.direct({"n": 1}, 5):
                pass
        assert info.value.local == codec.PROTOCOL_VERSION and info.value.remote == 7
        assert "v1" in str(info.value) and "v7" in str(info.value)
    finally:
        await rt.shutdown()
        server.close()
        await server.wait_closed()


async def test_backpressure_slow_consumer(served) -> None:
    rt, client, port = served
    n = 200_000
    stream = client.round_robin({"n": n})
    first = [await stream.__anext__() for _ in range(10)]
    await asyncio.sleep(0.3)  # the worker keeps producing while we sleep...
    conn = stream._conn
    assert conn is not None and conn.buffered < 100_000  # ...but reading paused
    rest = [x async for x in stream]
    assert first + rest == list(range(n))
