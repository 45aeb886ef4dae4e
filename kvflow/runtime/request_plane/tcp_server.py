"""Serving side of the TCP request plane: one listener per process, many endpoints.

Each accepted connection carries many concurrent streams (multiplexed by stream
id). A REQUEST frame starts a stream running the endpoint's async-generator
handler; each yielded item goes out as a DATA frame, then END (or ERROR). A
CANCEL frame stops the stream's Context and closes the generator. Writes are
coalesced per event-loop turn (one syscall for many frames); when the socket's
buffer is full the handlers pause (backpressure). A connection that sends
garbage, a truncated or oversize frame, or a different protocol version is closed
with a logged reason; other connections are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvflow.runtime import codec
from kvflow.runtime.codec import FrameKind
from kvflow.runtime.context import Context
from kvflow.runtime.errors import is_addr_in_use, port_in_use
from kvflow.runtime.request_plane.metrics import EndpointMetrics

log = logging.getLogger(__name__)

Handler = Callable[[Any, Context], AsyncIterator[Any]]
CANCEL_GRACE_S = 0.05


@dataclass
class ServedEndpoint:
    path: str
    instance_id: int
    handler: Handler
    decoder: msgspec.msgpack.Decoder
    draining: bool = False
    streams: set[asyncio.Task] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class TcpServer:
    """The process's request-plane listener."""

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        max_frame: int = codec.DEFAULT_MAX_FRAME,
        metrics: EndpointMetrics | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.max_frame = max_frame
        self.metrics = metrics
        self.ssl_context = ssl_context
        self.endpoints: dict[tuple[str, int], ServedEndpoint] = {}
        self.connections: set[ServerConnection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: ServerConnection(self), self.host, self.port, ssl=self.ssl_context
            )
        except OSError as exc:
            if is_addr_in_use(exc):
                raise port_in_use("request plane", self.host, self.port, "--tcp-port") from None
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self.host, self.port

    def register(self, path: str, instance_id: int, handler: Handler, request_type: Any) -> ServedEndpoint:
        served = ServedEndpoint(path, instance_id, handler, codec.decoder_for(request_type))
        served.idle.set()
        self.endpoints[(path, instance_id)] = served
        return served

    async def drain(self, served: ServedEndpoint, timeout: float) -> bool:
        """Refuse new streams for `served` and wait for its in-flight ones."""
        served.draining = True
        try:
            await asyncio.wait_for(served.idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning(
                "%s: %d streams still running after %.1fs drain; cancelling",
                served.path,
                len(served.streams),
                timeout,
            )
            for task in list(served.streams):
                task.cancel()
            return False

    def unregister(self, served: ServedEndpoint) -> None:
        self.endpoints.pop((served.path, served.instance_id), None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.abort("server closing")
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


class ServerConnection(asyncio.Protocol):
    """One client connection; streams multiplexed by id."""

    def __init__(self, server: TcpServer) -> None:
        self.server = server
        self.parser = codec.FrameParser(server.max_frame)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, tuple[asyncio.Task, Context]] = {}
        self._wbuf: list[bytes] = []
        self._flush_pending = False
        self._paused: asyncio.Future | None = None
        self._closed = False
        self.peer = "?"

    # -- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = str(transport.get_extra_info("peername"))
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
        except codec.OversizeFrame as exc:
            self.abort(f"bad frame: {exc}")
            return
        for version, kind, stream_id, payload in frames:
            if version != codec.PROTOCOL_VERSION:
                self._reject_version(version, stream_id)
                return
            try:
                self._dispatch(kind, stream_id, payload)
            except (msgspec.DecodeError, ValueError) as exc:
                self.abort(f"undecodable frame (kind {kind}): {exc}")
                return
            if self._closed:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        for task, ctx in list(self.streams.values()):
            self._stop_stream(task, ctx)
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    def pause_writing(self) -> None:
        if self._paused is None or self._paused.done():
            self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    # -- frames in -----------------------------------------------------------------
    def _dispatch(self, kind: int, stream_id: int, payload: bytes) -> None:
        if kind == FrameKind.REQUEST:
            self._start_stream(stream_id, payload)
        elif kind == FrameKind.CANCEL:
            entry = self.streams.get(stream_id)
            if entry is not None:
                self._stop_stream(*entry)
        elif kind == FrameKind.HELLO:
            codec.decode_hello(payload)
            self.write(
                codec.frame(
                    FrameKind.HELLO, 0, codec.encode(codec.HelloMsg(codec.PROTOCOL_VERSION, "server"))
                )
            )
        else:
            raise ValueError(f"unexpected frame kind {kind} from a client")

    def _reject_version(self, version: int, stream_id: int) -> None:
        msg = (
            f"wire protocol mismatch: worker speaks kvflow protocol v{codec.PROTOCOL_VERSION}, "
            f"client sent v{version}"
        )
        err = codec.encode(codec.ErrorMsg("ProtocolVersionError", msg, "protocol"))
        self.write(codec.frame(FrameKind.ERROR, stream_id, err))
        self.abort(msg, flush=True)

    def _start_stream(self, stream_id: int, payload: bytes) -> None:
        header = codec.decode_request_header(payload)
        served = self.server.endpoints.get((header.path, header.instance_id))
        if served is None or served.draining:
            why = "is shutting down" if served else "is not served here"
            self._send_error(
                stream_id,
                "WorkerShuttingDownError" if served else "NoSuchEndpoint",
                f"endpoint {header.path} instance {header.instance_id:x} {why}",
                "refused",
            )
            return
        ctx = Context(header.request_id)
        task = asyncio.ensure_future(self._run_stream(served, stream_id, header, ctx, len(payload)))
        self.streams[stream_id] = (task, ctx)
        served.streams.add(task)
        served.idle.clear()

    def _stop_stream(self, task: asyncio.Task, ctx: Context) -> None:
        ctx.stop_generating()
        if not task.done():
            asyncio.get_running_loop().call_later(CANCEL_GRACE_S, _cancel_if_running, task)

    # -- streams -------------------------------------------------------------------
    async def _run_stream(
        self, served: ServedEndpoint, stream_id: int, header: codec.RequestHeader, ctx: Context, nbytes: int
    ) -> None:
        metrics = self.server.metrics
        t0 = time.monotonic()
        if metrics:
            metrics.started(served.path, nbytes)
        count, out_bytes, failed = 0, 0, False
        gen: Any = None
        try:
            request = served.decoder.decode(header.body)
            gen = served.handler(request, ctx)
            frame, data_kind, encode = codec.frame, FrameKind.DATA, codec.encode
            async for item in gen:
                data = frame(data_kind, stream_id, encode(item))
                out_bytes += len(data)
                count += 1
                self.write(data)
                if ctx.is_stopped() or self._closed:
                    break
                if self._paused is not None and not self._paused.done():
                    await self._paused
            self.write(codec.frame(FrameKind.END, stream_id))
        except asyncio.CancelledError:
            failed = not ctx.is_stopped()
        except Exception as exc:
            failed = True
            log.debug("handler %s raised", served.path, exc_info=True)
            self._send_error(stream_id, type(exc).__name__, str(exc), "remote")
        finally:
            if gen is not None:
                with contextlib.suppress(BaseException):
                    await gen.aclose()
            self._finish_stream(served, stream_id, t0, count, out_bytes, failed)

    def _finish_stream(
        self, served: ServedEndpoint, stream_id: int, t0: float, count: int, out_bytes: int, failed: bool
    ) -> None:
        entry = self.streams.pop(stream_id, None)
        if entry is not None:
            served.streams.discard(entry[0])
        if not served.streams:
            served.idle.set()
        if self.server.metrics:
            self.server.metrics.finished(served.path, time.monotonic() - t0, count, out_bytes, failed)

    # -- frames out ----------------------------------------------------------------
    def _send_error(self, stream_id: int, error_type: str, message: str, category: str) -> None:
        self.write(
            codec.frame(
                FrameKind.ERROR, stream_id, codec.encode(codec.ErrorMsg(error_type, message, category))
            )
        )

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        self._wbuf.append(data)
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._closed or self.transport is None:
            self._wbuf.clear()
            return
        buf, self._wbuf = self._wbuf, []
        self.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def abort(self, reason: str, flush: bool = False) -> None:
        if self._closed:
            return
        log.warning("request plane: closing connection from %s: %s", self.peer, reason)
        if flush and self._wbuf and self.transport is not None:
            self.transport.write(b"".join(self._wbuf))
            self._wbuf.clear()
        self._closed = True
        if self.transport is not None:
            if flush:
                self.transport.close()
            else:
                self.transport.abort()


def _cancel_if_running(task: asyncio.Task) -> None:
    if not task.done():
        task.cancel()
