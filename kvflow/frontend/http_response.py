"""Responder: writes one HTTP/1.1 response (whole, or a chunked stream) to a connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"
TEXT = b"text/plain; charset=utf-8"
# Pieces of a stream queued before a write is forced, even within one event-loop turn.
MAX_COALESCED = 64


@dataclass(slots=True)
class HttpRequest:
    """A fully received request. Header names are lower-case."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    # False for HTTP/1.0 clients: streams are then close-delimited instead of chunked.
    chunked: bool = True


class Connection(Protocol):
    """What a Responder needs from the connection it writes to."""

    transport: asyncio.Transport | None
    # The peer is gone (or we closed): writes are dropped.
    is_closed: bool
    # The transport's buffer is over its high-water mark: writers should await drain().
    write_paused: bool

    async def drain(self) -> None: ...


_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_date_cache: list = [0, b""]


def _date_header() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_cache[1]


def _head(
    status: int, content_type: bytes, framing: bytes, keep_alive: bool, extra: Iterable[bytes]
) -> bytes:
    parts = [
        _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode(),
        b"server: kvflow\r\n",
        _date_header(),
        b"content-type: " + content_type + b"\r\n",
        framing,
    ]
    parts.extend(extra)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class Responder:
    """One response on one connection: `send(...)`, or `start_stream()` + `write()` + `end()`.

    A stream's first write leaves at once, with the head (time to first token). Later
    writes are coalesced: what is written during one event-loop turn leaves as one HTTP
    chunk in one transport write, flushed by a callback the turn schedules (or by `end()`,
    or once MAX_COALESCED pieces wait). A consumer that finds several tokens ready thus
    costs one syscall and one client read, not one per token. `write` returns True when the
    peer reads slower than we write; the writer should then `await drain()`. Once the peer
    is gone every write is dropped.
    """

    __slots__ = (
        "_chunked", "_conn", "_head", "_on_disconnect", "_pending", "_transport", "keep_alive",
        "started", "status",
    )

    def __init__(self, conn: Connection, keep_alive: bool, chunked: bool = True) -> None:
        self._conn = conn
        self._transport = conn.transport
        self.keep_alive = keep_alive
        self._chunked = chunked
        self.started = False
        self.status = 0
        self._on_disconnect: list[Callable[[], None]] = []
        self._head = b""  # a stream's head, until its first write
        self._pending: list[bytes] | None = None  # pieces written this turn, unframed

    def disconnected(self) -> bool:
        return self._conn.is_closed

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Run `callback` if the client goes away before the response is complete."""
        self._on_disconnect.append(callback)

    def notify_disconnect(self) -> None:
        callbacks, self._on_disconnect = self._on_disconnect, []
        for cb in callbacks:
            cb()

    def send(
        self,
        status: int,
        body: bytes,
        content_type: bytes = JSON,
        headers: Iterable[bytes] = (),
    ) -> None:
        """Write a whole response with a Content-Length."""
        assert not self.started, "response already started"
        self.started = True
        self.status = status
        framing = b"content-length: %d\r\n" % len(body)
        head = _head(status, content_type, framing, self.keep_alive, headers)
        if not self._conn.is_closed:
            self._transport.write(head + body)  # type: ignore[union-attr]

    def start_stream(
        self, status: int = 200, content_type: bytes = EVENT_STREAM, headers: Iterable[bytes] = ()
    ) -> None:
        """Begin a chunked response; follow with write() calls and one end()."""
        assert not self.started, "response already started"
        self.started = True
        self.status = status
        extra = (b"cache-control: no-cache\r\n", *headers)
        if self._chunked:
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing, self.keep_alive = b"", False  # HTTP/1.0: the stream ends at close
        self._head = _head(status, content_type, framing, self.keep_alive, extra)

    def write(self, data: bytes) -> bool:
        """Send one piece of a streamed response (empty data is skipped).

        Returns True when the client is behind: `await drain()` before writing more.
        """
        conn = self._conn
        if data and not conn.is_closed:
            pending = self._pending
            if pending is None:
                self._pending = [data]
                if self._head:
                    self.flush()
                else:
                    asyncio.get_running_loop().call_soon(self.flush)
            else:
                pending.append(data)
                if len(pending) >= MAX_COALESCED:
                    self.flush()
        return conn.write_paused

    def flush(self, tail: bytes = b"") -> None:
        """Write the head (if unsent), the queued pieces as one chunk, then `tail` (framed)."""
        pending, self._pending = self._pending, None
        out, self._head = self._head, b""
        if pending:
            body = pending[0] if len(pending) == 1 else b"".join(pending)
            out += b"%x\r\n%b\r\n" % (len(body), body) if self._chunked else body
        out += tail
        transport = self._transport
        if out and not self._conn.is_closed and not transport.is_closing():  # type: ignore[union-attr]
            transport.write(out)  # type: ignore[union-attr]

    async def drain(self) -> None:
        """Wait until the transport's buffer has room again (returns at once if it has)."""
        if self._conn.write_paused:
            self.flush()
            await self._conn.drain()

    def end(self) -> None:
        """Finish a streamed response: write what is queued and the last chunk, now."""
        self.flush(b"0\r\n\r\n" if self._chunked else b"")
