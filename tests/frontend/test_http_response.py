"""kvflow.frontend.http_response: streamed writes coalesce per loop turn into valid HTTP chunks."""

from __future__ import annotations

import asyncio

import httptools

from kvflow.frontend.http_response import MAX_COALESCED, Responder


class Transport:
    """Records each write (one write = one syscall on a real transport)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing


class Conn:
    def __init__(self) -> None:
        self.transport = Transport()
        self.is_closed = False
        self.write_paused = False

    async def drain(self) -> None:
        self.write_paused = False


def parse(raw: bytes) -> tuple[int, list[bytes], bool]:
    """(status, chunk bodies, complete) of a response, read by a real HTTP parser."""

    class Sink:
        status = 0
        body: list[bytes] = []
        done = False

        def on_body(self, data: bytes) -> None:
            self.body.append(data)

        def on_message_complete(self) -> None:
            self.done = True

    sink = Sink()
    sink.body = []
    parser = httptools.HttpResponseParser(sink)
    parser.feed_data(raw)
    return parser.get_status_code(), sink.body, sink.done


async def test_first_write_leaves_at_once_then_a_turn_coalesces() -> None:
    conn = Conn()
    r = Responder(conn, keep_alive=True)  # type: ignore[arg-type]
    r.start_stream()
    assert conn.transport.writes == []  # the head waits for the first piece
    r.write(b"data: 1\n\n")
    assert len(conn.transport.writes) == 1 and b"200 OK" in conn.transport.writes[0]
    for i in range(2, 6):
        r.write(b"data: %d\n\n" % i)
    assert len(conn.transport.writes) == 1  # queued until the loop turn ends
    await asyncio.sleep(0)
    assert len(conn.transport.writes) == 2  # four pieces, one write
    r.write(b"data: [DONE]\n\n")
    r.end()
    assert len(conn.transport.writes) == 3  # last piece and terminator together
    status, body, done = parse(b"".join(conn.transport.writes))
    assert status == 200 and done
    assert b"".join(body) == b"".join(b"data: %d\n\n" % i for i in range(1, 6)) + b"data: [DONE]\n\n"
    await asyncio.sleep(0)
    assert len(conn.transport.writes) == 3  # the scheduled flush found nothing left


async def test_many_pieces_in_one_turn_are_capped() -> None:
    conn = Conn()
    r = Responder(conn, keep_alive=True)  # type: ignore[arg-type]
    r.start_stream()
    r.write(b"x")
    for _ in range(MAX_COALESCED):
        r.write(b"y")
    assert len(conn.transport.writes) == 2  # forced out at the cap, without waiting
    r.end()
    _, body, done = parse(b"".join(conn.transport.writes))
    assert done and b"".join(body) == b"x" + b"y" * MAX_COALESCED


async def test_empty_stream_and_empty_pieces() -> None:
    conn = Conn()
    r = Responder(conn, keep_alive=False)  # type: ignore[arg-type]
    r.start_stream()
    r.write(b"")
    r.end()
    assert len(conn.transport.writes) == 1
    raw = conn.transport.writes[0]
    assert b"connection: close" in raw
    status, body, done = parse(raw)
    assert status == 200 and body == [] and done


async def test_nothing_is_written_after_the_peer_left() -> None:
    conn = Conn()
    r = Responder(conn, keep_alive=True)  # type: ignore[arg-type]
    r.start_stream()
    r.write(b"a")
    r.write(b"b")  # queued
    conn.is_closed = True
    await asyncio.sleep(0)
    r.write(b"c")
    r.end()
    assert len(conn.transport.writes) == 1  # only the first, sent while connected


async def test_http10_stream_is_not_chunked() -> None:
    conn = Conn()
    r = Responder(conn, keep_alive=True, chunked=False)  # type: ignore[arg-type]
    r.start_stream()
    r.write(b"data: a\n\n")
    r.write(b"data: b\n\n")
    r.end()
    raw = b"".join(conn.transport.writes)
    assert not r.keep_alive and b"transfer-encoding" not in raw
    assert raw.endswith(b"\r\n\r\ndata: a\n\ndata: b\n\n")


async def test_drain_flushes_what_is_queued() -> None:
    conn = Conn()
    r = Responder(conn, keep_alive=True)  # type: ignore[arg-type]
    r.start_stream()
    r.write(b"a")
    conn.write_paused = True
    assert r.write(b"b") is True  # the client is behind
    await r.drain()
    assert len(conn.transport.writes) == 2 and not conn.write_paused
