"""Calling side of the TCP request plane: one persistent connection per worker.

Streams are multiplexed on the connection by id. Responses are queued per stream
in a deque and handed to the consumer without an asyncio.Queue per item; when the
consumers fall behind, the connection stops reading (TCP backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque

import msgspec

from kvflow.runtime import codec
from kvflow.runtime.codec import HEADER_SIZE, LENGTH_REST, PROTOCOL_VERSION, FrameKind
from kvflow.runtime.errors import (
    FrameError,
    ProtocolVersionError,
    RemoteError,
    WorkerShuttingDownError,
    WorkerUnavailableError,
)

log = logging.getLogger(__name__)
_unpack_header = codec.HEADER.unpack_from

HIGH_WATER_FRAMES = 8192
LOW_WATER_FRAMES = 2048


class StreamSink:
    """What a connection delivers frames to (request_plane.stream implements it)."""

    def on_data(self, payload: bytes) -> None: ...
    def on_end(self) -> None: ...
    def on_error(self, exc: Exception) -> None: ...


_DATA = int(FrameKind.DATA)
_END = int(FrameKind.END)
_ERROR = int(FrameKind.ERROR)
_HELLO = int(FrameKind.HELLO)


class ClientConnection(asyncio.Protocol):
    def __init__(self, pool: ConnectionPool, key: tuple[str, int], max_frame: int) -> None:
        self.pool = pool
        self.key = key
        self.max_frame = max_frame
        self.transport: asyncio.Transport | None = None
        self.sinks: dict[int, StreamSink] = {}
        self.next_id = 1
        self.closed = False
        self.buffered = 0
        self.reading_paused = False
        self.close_error: Exception | None = None
        self._buffer = codec.FrameBuffer()  # an incomplete frame, between reads
        # Pings: every HELLO we send is answered by one HELLO (servers of every version do).
        self._hellos_sent = 0
        self._hellos_got = 0
        self._pings: deque[tuple[int, asyncio.Future[None]]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_hello()

    def _send_hello(self) -> None:
        hello = codec.encode(codec.HelloMsg(codec.PROTOCOL_VERSION, "client"))
        self.transport.write(codec.frame(FrameKind.HELLO, 0, hello))  # type: ignore[union-attr]
        self._hellos_sent += 1

    def ping(self) -> asyncio.Future[None]:
        """A future done when the worker answers a HELLO sent now (its event loop runs)."""
        fut = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            fut.set_exception(self.close_error or WorkerUnavailableError("connection is closed"))
            return fut
        while self._pings and self._pings[0][1].done():  # pings whose caller gave up
            self._pings.popleft()
        self._send_hello()
        self._pings.append((self._hellos_sent, fut))
        return fut

    def _on_hello(self) -> None:
        self._hellos_got += 1
        while self._pings and self._pings[0][0] <= self._hellos_got:
            fut = self._pings.popleft()[1]
            if not fut.done():
                fut.set_result(None)

    def open_stream(self, sink: StreamSink, header: codec.RequestHeader) -> int:
        stream_id = self.next_id
        self.next_id += 1
        if self.closed or self.transport is None:
            sink.on_error(
                self.close_error
                or WorkerUnavailableError(f"connection to worker at {self.key[0]}:{self.key[1]} is closed")
            )
            return stream_id
        self.sinks[stream_id] = sink
        self.transport.write(codec.frame(FrameKind.REQUEST, stream_id, codec.encode(header)))
        return stream_id

    def cancel_stream(self, stream_id: int) -> None:
        if self.sinks.pop(stream_id, None) is not None and not self.closed and self.transport:
            self.transport.write(codec.frame(FrameKind.CANCEL, stream_id))

    def release(self, stream_id: int) -> None:
        self.sinks.pop(stream_id, None)

    def data_received(self, data: bytes) -> None:
        """Parse the frames in `data` and hand each DATA payload to its stream's sink.

        The hot path: one header unpack and one payload slice per frame, no other
        per-frame objects; backpressure is counted once per read.
        """
        whole = self._buffer.join(data)
        if whole is None:
            return
        pos, n, got = 0, len(whole), 0
        sinks, unpack, max_frame = self.sinks, _unpack_header, self.max_frame
        while n - pos >= HEADER_SIZE:
            length, version, kind, stream_id = unpack(whole, pos)
            if length < LENGTH_REST or length > max_frame:
                bad = codec.OversizeFrame(length, max_frame)
                self._fail(FrameError(f"worker {self.key} sent a bad frame: {bad}"))
                return
            end = pos + 4 + length
            if end > n:
                break
            if version != PROTOCOL_VERSION:
                self._fail(ProtocolVersionError(PROTOCOL_VERSION, version))
                return
            if kind == _DATA:
                sink = sinks.get(stream_id)
                if sink is not None:
                    got += 1
                    sink.on_data(whole[pos + HEADER_SIZE : end])
            elif not self._on_control(kind, stream_id, whole[pos + HEADER_SIZE : end]):
                return
            pos = end
        if pos < n:
            self._buffer.keep(whole, pos)
        self.buffered += got
        if self.buffered > HIGH_WATER_FRAMES and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()

    def _on_control(self, kind: int, stream_id: int, payload: bytes) -> bool:
        """Handle an END, ERROR or HELLO frame; False when the connection failed."""
        if kind == _END:
            sink = self.sinks.pop(stream_id, None)
            if sink is not None:
                sink.on_end()
        elif kind == _ERROR:
            self._on_error_frame(stream_id, payload)
        elif kind == _HELLO:
            self._on_hello()
        else:
            self._fail(FrameError(f"worker {self.key} sent unexpected frame kind {kind}"))
        return not self.closed

    def consumed(self, n: int = 1) -> None:
        self.buffered -= n
        if self.reading_paused and self.buffered < LOW_WATER_FRAMES and self.transport:
            self.reading_paused = False
            self.transport.resume_reading()

    def _on_error_frame(self, stream_id: int, payload: bytes) -> None:
        try:
            err = codec.decode_error(payload)
        except msgspec.DecodeError:
            self._fail(FrameError(f"worker {self.key} sent an undecodable error frame"))
            return
        if err.category == "protocol":
            self._fail(FrameError(err.message))
            return
        sink = self.sinks.pop(stream_id, None)
        if sink is None:
            return
        if err.category == "refused":
            sink.on_error(WorkerShuttingDownError(err.message))
        else:
            sink.on_error(RemoteError(err.error_type, err.message))

    def _fail(self, exc: Exception) -> None:
        log.warning("request plane: connection to %s failed: %s", self.key, exc)
        self._close_with(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_with(None)

    def _close_with(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.forget(self)
        self.close_error = (
            exc
            if exc is not None
            else WorkerUnavailableError(f"connection to worker at {self.key[0]}:{self.key[1]} lost")
        )
        sinks, self.sinks = self.sinks, {}
        for sink in sinks.values():
            sink.on_error(self.close_error)
        while self._pings:
            fut = self._pings.popleft()[1]
            if not fut.done():
                fut.set_exception(self.close_error)


class ConnectionPool:
    """One connection per (host, port), opened on demand and shared by all streams."""

    def __init__(
        self,
        max_frame: int = codec.DEFAULT_MAX_FRAME,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.max_frame = max_frame
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self._conns: dict[tuple[str, int], ClientConnection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future] = {}

    def get_nowait(self, host: str, port: int) -> ClientConnection | None:
        conn = self._conns.get((host, port))
        return conn if conn is not None and not conn.closed else None

    async def get(self, host: str, port: int) -> ClientConnection:
        key = (host, port)
        conn = self.get_nowait(host, port)
        if conn is not None:
            return conn
        fut = self._connecting.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._connect(key))
            self._connecting[key] = fut
            fut.add_done_callback(lambda _: self._connecting.pop(key, None))
        return await asyncio.shield(fut)

    async def _connect(self, key: tuple[str, int]) -> ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: ClientConnection(self, key, self.max_frame), key[0], key[1], ssl=self.ssl_context
                ),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise WorkerUnavailableError(f"cannot connect to worker at {key[0]}:{key[1]}: {exc}") from exc
        self._conns[key] = conn
        return conn

    def forget(self, conn: ClientConnection) -> None:
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]

    async def close(self) -> None:
        for conn in list(self._conns.values()):
            if conn.transport is not None:
                conn.transport.close()
        self._conns.clear()
