"""A small HTTP/1.1 server: asyncio Protocol + httptools, keep-alive, pipelining, limits.

Each connection parses requests as bytes arrive and serves them strictly in order, one
at a time, so pipelined responses cannot interleave. A request whose body would exceed
the limit gets 413 (headers over theirs, 431) and the connection is closed after the rest
of its upload has been drained (so the client reads the error instead of a reset). A client that disconnects
mid-response has its request's disconnect callbacks run and its handler task cancelled.
A connection idle too long is closed; one whose headers or body take too long gets 408
and is closed (http_timeouts). Beyond `max_connections` open ones, a new client gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from kvflow.frontend.errors import ApiError
from kvflow.frontend.http_response import HttpRequest, Responder
from kvflow.frontend.http_timeouts import BODY, HEADER, IDLE, HttpTimeouts, PhaseTimer

log = logging.getLogger(__name__)

Handler = Callable[[HttpRequest, Responder], Awaitable[None]]

_LINGER_S = 2.0  # how long to keep draining an oversized upload before closing


class HttpConnection(asyncio.Protocol):
    """One client connection. See the module docstring for the rules."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._queue: deque[HttpRequest] = deque()
        self._task: asyncio.Task | None = None
        self._responder: Responder | None = None
        self.is_closed = False
        self._reading_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._timer = PhaseTimer(server.timeouts, self._on_timeout)
        self._reject: ApiError | None = None
        self._discarding = False
        self._reset_message()

    # ------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = self._server
        if len(server.connections) >= server.max_connections:
            server.on_close("limit")
            self._fail(ApiError(
                503, f"The server has {server.max_connections} connections open, its limit; "
                "retry in a moment.", type="server_error", code="too_many_connections"))
            return
        server.connections.add(self)
        self._timer.start(IDLE)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject = ApiError(400, "Protocol upgrades are not supported; use HTTP/1.1.")
        except httptools.HttpParserError as exc:
            self._reject = ApiError(400, f"Malformed HTTP request ({exc}); send valid HTTP/1.1.")
        if self._reject is not None:
            self._discarding = True
            if self._task is None:
                self._fail(self._reject)

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self.write_paused = False
        self._server.connections.discard(self)
        self._timer.stop()
        self._queue.clear()
        if self._responder is not None:
            self._responder.notify_disconnect()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._wake_drain()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # ------------------------------------------------------------ Connection protocol

    async def drain(self) -> None:
        if not self.write_paused or self.is_closed:
            return
        if self._drain_waiter is None or self._drain_waiter.done():
            self._drain_waiter = asyncio.get_running_loop().create_future()
        await self._drain_waiter

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------ parser callbacks

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0

    def on_message_begin(self) -> None:
        self._timer.start(HEADER)
        self._reset_message()

    def on_url(self, url: bytes) -> None:
        if self._head_fits(len(url)):
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_fits(len(name) + len(value)):
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = text if old is None else f"{old}, {text}"

    def _head_fits(self, size: int) -> bool:
        """Count request-line and header bytes; past the limit, refuse the request (431)."""
        self._head_size += size
        if self._head_size <= self._server.max_header_bytes:
            return True
        if self._reject is None:
            self._reject = ApiError(
                431, f"Request line and headers exceed the {self._server.max_header_bytes}-byte "
                "limit; send fewer or shorter headers.", code="headers_too_large")
        return False

    def on_headers_complete(self) -> None:
        self._timer.start(BODY)
        if self._reject is not None:
            return
        length = self._headers.get("content-length")
        limit = self._server.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            self._reject = _too_large(limit)
            return
        expect = self._headers.get("expect", "").lower()
        if expect == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._reject is not None:
            return
        self._body_size += len(body)
        if self._body_size > self._server.max_body_bytes:
            self._reject = _too_large(self._server.max_body_bytes)
            self._body.clear()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._timer.stop()
        if self._reject is not None:
            return
        path, _, query = self._url.decode("latin-1").partition("?")
        request = HttpRequest(
            method=self._parser.get_method().decode("ascii"),
            path=path,
            query=query,
            headers=self._headers,
            body=b"".join(self._body),
            keep_alive=self._parser.should_keep_alive(),
            chunked=self._parser.get_http_version() != "1.0",
        )
        self._reset_message()
        self._queue.append(request)
        if len(self._queue) >= self._server.max_pipelined and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve_queue())

    # ------------------------------------------------------------ serving

    async def _serve_queue(self) -> None:
        try:
            while self._queue and not self.is_closed:
                request = self._queue.popleft()
                self._maybe_resume_reading()
                keep_alive = await self._serve_one(request)
                if not keep_alive:
                    self._close_after_flush()
                    return
        finally:
            self._task = None
            self._responder = None
        if self._reject is not None:
            self._fail(self._reject)  # a later pipelined request was refused mid-upload
            return
        self._arm_idle_timer()

    async def _serve_one(self, request: HttpRequest) -> bool:
        """Serve one request; returns whether the connection stays open."""
        responder = Responder(self, request.keep_alive, request.chunked)
        self._responder = responder
        try:
            await self._server.handler(request, responder)
        except ApiError as exc:
            self._send_error(responder, exc)
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            self._send_error(responder, _internal("Internal server error; see the server log."))
        if not responder.started:
            self._send_error(responder, _internal("The handler sent no response."))
        return responder.keep_alive

    def _send_error(self, responder: Responder, exc: ApiError) -> None:
        if responder.started:
            # Mid-stream: nothing valid can follow; drop the connection.
            responder.keep_alive = False
            self._close_after_flush()
            return
        responder.send(exc.status, exc.body(), headers=exc.headers())

    def _maybe_resume_reading(self) -> None:
        if self._reading_paused and len(self._queue) < self._server.max_pipelined // 2:
            self._reading_paused = False
            if self.transport is not None and not self.is_closed:
                self.transport.resume_reading()

    # ------------------------------------------------------------ closing

    def _fail(self, exc: ApiError) -> None:
        """Answer a request we will not serve, then drain the upload and close.

        Called only when no response is in progress, so the error cannot interleave.
        """
        self._timer.stop()
        self._discarding = True
        self._queue.clear()
        responder = Responder(self, keep_alive=False, chunked=True)
        responder.send(exc.status, exc.body())
        transport = self.transport
        if transport is None or self.is_closed:
            return
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(_LINGER_S, transport.close)
        else:
            transport.close()

    def _close_after_flush(self) -> None:
        self._flush_responder()
        if self.transport is not None and not self.is_closed:
            self.transport.close()

    def _flush_responder(self) -> None:
        """Send chunks a responder batched this loop turn before the transport closes."""
        if self._responder is not None:
            self._responder.flush()

    def _arm_idle_timer(self) -> None:
        if self.is_closed or self._task is not None or self._timer.phase:
            return  # a next request has begun: its header/body timer runs
        self._timer.start(IDLE)

    def _on_timeout(self, phase: str) -> None:
        if self.is_closed:
            return
        if self._task is not None or self._queue:  # a response is in progress: wait for it
            self._timer.start(phase)
            return
        self._server.on_close(phase)
        if phase == IDLE:
            self._close_after_flush()
            return
        limit = self._server.timeouts.limit(phase)
        self._fail(ApiError(408, f"The request's {phase} did not arrive within {limit:g}s; "
                            "send the whole request promptly.", code="request_timeout"))

    def shutdown(self) -> None:
        """Close after flushing what is written; a request in flight sees a disconnect."""
        self._flush_responder()
        if self.transport is not None and not self.is_closed:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping unsent data (for requests that outlived the grace)."""
        if self.transport is not None and not self.is_closed:
            self.transport.abort()

    def busy_task(self) -> asyncio.Task | None:
        """The task serving this connection's requests, if one is in flight."""
        return self._task


def _internal(message: str) -> ApiError:
    return ApiError(500, message, type="server_error")


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"Request body is larger than the {limit}-byte limit; send a smaller request.",
        code="request_too_large",
    )


class HttpServer:
    """Listens on host:port and serves every request through one handler coroutine."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int,
        timeouts: HttpTimeouts,
        max_pipelined: int,
        max_header_bytes: int = 64 * 1024,
        max_connections: int = 8192,
        on_close: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.timeouts = timeouts
        self.max_pipelined = max_pipelined
        self.max_connections = max_connections
        self.on_close = on_close  # on_close(reason): closed by a timeout phase, or "limit"
        self.connections: set[HttpConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(
        self, host: str, port: int, *, ssl_context: ssl.SSLContext | None, backlog: int
    ) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self), host, port, ssl=ssl_context, backlog=backlog,
            reuse_address=True,
        )
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_s`, then close all."""
        if self._server is None:
            return
        self._server.close()
        busy = [t for c in self.connections if (t := c.busy_task()) is not None]
        for conn in list(self.connections):
            if conn.busy_task() is None:
                conn.shutdown()
        if busy:
            await asyncio.wait(busy, timeout=grace_s)
        for conn in list(self.connections):
            if conn.busy_task() is None:
                conn.shutdown()
            else:
                conn.abort()
        await self._server.wait_closed()
        self._server = None
