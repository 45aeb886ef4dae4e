"""NATS request plane: the TCP plane's frames carried as NATS messages (optional transport).

Serving: an instance subscribes `kvflow.rq.<ns>.<comp>.<ep>.<instance hex>` (requests) and
`<that>.cancel`. Calling: a client owns one inbox `<inbox>.*`; a stream with id N sends a
REQUEST frame (the TCP plane's RequestHeader encoding, see codec.py) with reply subject
`<inbox>.N` and receives DATA/END/ERROR frames there; a CANCEL frame sent to
`<subject>.cancel` with the same reply subject stops the handler. Every NATS message holds
exactly one frame, so the protocol version byte is checked per message.

Liveness: NATS has no connection per worker to lose, so the serving side sends a HELLO frame
on every stream that has been quiet for `heartbeat_s`, and the calling side fails a stream
with WorkerUnavailableError (retryable before the first response) after `3 * heartbeat_s`
of silence (not counting a stall of this process's own event loop, which it notices when
its liveness tick wakes late). A request to a subject nobody serves fails at once (NATS "no
responders").
NATS gives no backpressure: `consumed()` is a no-op and a slow consumer buffers in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from kvflow.runtime import codec
from kvflow.runtime.codec import FrameKind
from kvflow.runtime.context import Context
from kvflow.runtime.errors import (
    FrameError,
    ProtocolVersionError,
    RemoteError,
    WorkerShuttingDownError,
    WorkerUnavailableError,
)
from kvflow.runtime.events.nats import NATS_ERRORS, connect_nats
from kvflow.runtime.request_plane.metrics import EndpointMetrics
from kvflow.runtime.request_plane.tcp_client import StreamSink
from kvflow.runtime.request_plane.tcp_server import CANCEL_GRACE_S, ServedEndpoint

log = logging.getLogger(__name__)

SUBJECT_ROOT = "kvflow.rq"
NO_RESPONDERS = "503"
SILENCE_FACTOR = 3.0


def instance_subject(path: str, instance_id: int) -> str:
    """Where instance `instance_id` of endpoint `ns.comp.ep` listens for requests."""
    return f"{SUBJECT_ROOT}.{path}.{instance_id:016x}"


@dataclass(frozen=True)
class Frame:
    kind: int
    stream_id: int
    payload: bytes


def parse_frame(data: bytes) -> Frame:
    """One NATS message → one frame; raises FrameError / ProtocolVersionError."""
    if len(data) < codec.HEADER_SIZE:
        raise FrameError(f"NATS message of {len(data)} bytes is shorter than a frame header")
    length, version, kind, stream_id = codec.HEADER.unpack_from(data)
    if version != codec.PROTOCOL_VERSION:
        raise ProtocolVersionError(codec.PROTOCOL_VERSION, version)
    if length != len(data) - 4:
        raise FrameError(f"frame length {length} does not match the NATS message size {len(data)}")
    return Frame(kind, stream_id, data[codec.HEADER_SIZE:])


@dataclass
class _ServerStream:
    ctx: Context
    reply: str
    stream_id: int
    task: asyncio.Task | None = None
    last_sent: float = field(default_factory=time.monotonic)


@dataclass
class _ClientStream:
    sink: StreamSink
    subject: str
    last_seen: float = field(default_factory=time.monotonic)


class NatsRequestPlane:
    """Both sides of the NATS request plane for one process, over one NATS connection.

    Serving: `await serve(served)` / `await unserve(served)` with the same ServedEndpoint the
    TCP server registered, so `TcpServer.drain(served)` also waits for NATS streams.
    Calling: the object itself is the "connection" a ResponseStream attaches to
    (`open_stream`, `cancel_stream`, `release`, `consumed`, `closed`).
    """

    def __init__(self, url: str, *, metrics: EndpointMetrics | None = None,
                 heartbeat_s: float = 1.0, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.metrics = metrics
        self.heartbeat_s = heartbeat_s
        self.connect_timeout = connect_timeout
        self.closed = False
        self._nc: NatsClient | None = None
        self._inbox = ""
        self._ids = itertools.count(1)
        self._calls: dict[int, _ClientStream] = {}
        self._serving: dict[str, _ServerStream] = {}  # by reply subject
        self._subs: dict[int, list[NatsSubscription]] = {}  # id(served) → its subscriptions
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> NatsRequestPlane:
        self._nc = await connect_nats(self.url, "kvflow-requests", connect_timeout=self.connect_timeout)
        self._inbox = self._nc.new_inbox()
        await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)
        self._spawn(self._liveness_loop())
        return self

    async def close(self) -> None:
        self.closed = True
        streams = [e.task for e in self._serving.values() if e.task is not None]
        for entry in list(self._serving.values()):
            entry.ctx.stop_generating()
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.sink.on_error(WorkerUnavailableError("NATS request plane closed"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 2.0)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _liveness_loop(self) -> None:
        """Serving side: heartbeat quiet streams. Calling side: fail streams gone silent."""
        period = self.heartbeat_s / 2
        woke = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            stalled = now - woke > period + self.heartbeat_s
            woke = now
            for entry in list(self._serving.values()):
                if now - entry.last_sent >= self.heartbeat_s:
                    await self._send(entry, codec.frame(FrameKind.HELLO, entry.stream_id))
            for sid, call in list(self._calls.items()):
                if stalled:  # this process did not run (GC, CPU starved): the silence is ours
                    call.last_seen = now
                    continue
                if now - call.last_seen > SILENCE_FACTOR * self.heartbeat_s:
                    del self._calls[sid]
                    call.sink.on_error(WorkerUnavailableError(
                        f"worker on {call.subject} silent for {now - call.last_seen:.1f}s"))

    # -- calling side --------------------------------------------------------------------
    def open_stream(self, sink: StreamSink, header: codec.RequestHeader) -> int:
        if self.closed or self._nc is None:
            raise WorkerUnavailableError("the NATS request plane is closed or not started")
        stream_id = next(self._ids)
        subject = instance_subject(header.path, header.instance_id)
        self._calls[stream_id] = _ClientStream(sink, subject)
        request = codec.frame(FrameKind.REQUEST, stream_id, codec.encode(header))
        self._spawn(self._publish_request(stream_id, subject, request))
        return stream_id

    async def _publish_request(self, stream_id: int, subject: str, request: bytes) -> None:
        try:
            await self._nc.publish(subject, request, reply=f"{self._inbox}.{stream_id}")  # type: ignore[union-attr]
        except NATS_ERRORS as exc:
            call = self._calls.pop(stream_id, None)
            if call is not None:
                call.sink.on_error(WorkerUnavailableError(
                    f"cannot send request to {subject} over NATS at {self.url}: {exc or type(exc).__name__}"))

    def cancel_stream(self, stream_id: int) -> None:
        call = self._calls.pop(stream_id, None)
        if call is not None and not self.closed:
            cancel = codec.frame(FrameKind.CANCEL, stream_id)
            self._spawn(self._publish_quietly(f"{call.subject}.cancel", cancel, f"{self._inbox}.{stream_id}"))

    async def _publish_quietly(self, subject: str, data: bytes, reply: str = "") -> None:
        with contextlib.suppress(*NATS_ERRORS):
            await self._nc.publish(subject, data, reply=reply)  # type: ignore[union-attr]

    def release(self, stream_id: int) -> None:
        self._calls.pop(stream_id, None)

    def consumed(self, n: int = 1) -> None:
        return None  # NATS offers no flow control to apply

    async def _on_reply(self, msg: Msg) -> None:
        try:
            stream_id = int(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        call = self._calls.get(stream_id)
        if call is None:
            return
        call.last_seen = time.monotonic()
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
            del self._calls[stream_id]
            call.sink.on_error(WorkerUnavailableError(f"no worker is serving {call.subject}"))
            return
        try:
            frame = parse_frame(msg.data)
        except (FrameError, ProtocolVersionError) as exc:
            del self._calls[stream_id]
            call.sink.on_error(exc)
            return
        self._deliver(stream_id, call, frame)

    def _deliver(self, stream_id: int, call: _ClientStream, frame: Frame) -> None:
        if frame.kind == FrameKind.DATA:
            call.sink.on_data(frame.payload)
        elif frame.kind == FrameKind.END:
            del self._calls[stream_id]
            call.sink.on_end()
        elif frame.kind == FrameKind.ERROR:
            del self._calls[stream_id]
            call.sink.on_error(_error_from(frame.payload, call.subject))
        elif frame.kind != FrameKind.HELLO:  # HELLO = heartbeat
            del self._calls[stream_id]
            call.sink.on_error(FrameError(f"{call.subject} sent unexpected frame kind {frame.kind}"))

    # -- serving side --------------------------------------------------------------------
    async def serve(self, served: ServedEndpoint) -> str:
        """Subscribe the instance's subjects; returns the request subject."""
        assert self._nc is not None, "NatsRequestPlane.serve before start()"
        subject = instance_subject(served.path, served.instance_id)

        async def on_request(msg: Msg) -> None:
            self._on_request(served, msg)

        async def on_cancel(msg: Msg) -> None:
            self._on_cancel(msg)

        subs = [await self._nc.subscribe(subject, cb=on_request),
                await self._nc.subscribe(f"{subject}.cancel", cb=on_cancel)]
        self._subs[id(served)] = subs
        await self._nc.flush()
        return subject

    async def unserve(self, served: ServedEndpoint) -> None:
        for sub in self._subs.pop(id(served), []):
            with contextlib.suppress(*NATS_ERRORS):
                await sub.unsubscribe()

    def _on_request(self, served: ServedEndpoint, msg: Msg) -> None:
        if not msg.reply:
            log.warning("nats request plane: request on %s has no reply subject; dropped", msg.subject)
            return
        try:
            frame = parse_frame(msg.data)
        except (FrameError, ProtocolVersionError) as exc:
            self._reply_error(msg.reply, 0, type(exc).__name__, str(exc), "protocol")
            return
        try:
            if frame.kind != FrameKind.REQUEST:
                raise FrameError(f"expected a REQUEST frame on {msg.subject}, got kind {frame.kind}")
            header = codec.decode_request_header(frame.payload)
        except (FrameError, msgspec.DecodeError) as exc:
            self._reply_error(msg.reply, frame.stream_id, type(exc).__name__, str(exc), "protocol")
            return
        if served.draining:
            self._reply_error(msg.reply, frame.stream_id, "WorkerShuttingDownError",
                              f"endpoint {served.path} instance {served.instance_id:x} is shutting down",
                              "refused")
            return
        entry = _ServerStream(Context(header.request_id), msg.reply, frame.stream_id)
        entry.task = asyncio.ensure_future(self._run_stream(served, entry, header, len(frame.payload)))
        self._serving[entry.reply] = entry
        served.streams.add(entry.task)
        served.idle.clear()

    def _on_cancel(self, msg: Msg) -> None:
        entry = self._serving.get(msg.reply)
        if entry is None:
            return
        entry.ctx.stop_generating()
        if entry.task is not None and not entry.task.done():
            asyncio.get_running_loop().call_later(CANCEL_GRACE_S, _cancel_if_running, entry.task)

    async def _run_stream(self, served: ServedEndpoint, entry: _ServerStream,
                          header: codec.RequestHeader, nbytes: int) -> None:
        ctx = entry.ctx
        started = time.monotonic()
        if self.metrics:
            self.metrics.started(served.path, nbytes)
        count, out_bytes, failed = 0, 0, False
        gen: Any = None
        try:
            gen = served.handler(served.decoder.decode(header.body), ctx)
            async for item in gen:
                data = codec.frame(FrameKind.DATA, entry.stream_id, codec.encode(item))
                count, out_bytes = count + 1, out_bytes + len(data)
                await self._send(entry, data)
                if ctx.is_stopped():
                    break
            await self._send(entry, codec.frame(FrameKind.END, entry.stream_id))
        except asyncio.CancelledError:
            failed = not ctx.is_stopped()
        except Exception as exc:
            failed = True
            log.debug("handler %s raised", served.path, exc_info=True)
            self._reply_error(entry.reply, entry.stream_id, type(exc).__name__, str(exc), "remote")
        finally:
            if gen is not None:
                with contextlib.suppress(BaseException):
                    await gen.aclose()
            self._finish_stream(served, entry, started, count, out_bytes, failed)

    def _finish_stream(self, served: ServedEndpoint, entry: _ServerStream, started: float,
                       count: int, out_bytes: int, failed: bool) -> None:
        self._serving.pop(entry.reply, None)
        served.streams.discard(entry.task)
        if not served.streams:
            served.idle.set()
        if self.metrics:
            self.metrics.finished(served.path, time.monotonic() - started, count, out_bytes, failed)

    async def _send(self, entry: _ServerStream, data: bytes) -> None:
        entry.last_sent = time.monotonic()
        try:
            await self._nc.publish(entry.reply, data)  # type: ignore[union-attr]
        except NATS_ERRORS as exc:  # the caller will see silence and fail over
            log.debug("nats request plane: reply to %s failed: %s", entry.reply, exc)
            entry.ctx.stop_generating()

    def _reply_error(self, reply: str, stream_id: int, error_type: str, message: str, category: str) -> None:
        err = codec.encode(codec.ErrorMsg(error_type, message, category))
        self._spawn(self._publish_quietly(reply, codec.frame(FrameKind.ERROR, stream_id, err)))


def _error_from(payload: bytes, subject: str) -> Exception:
    try:
        err = codec.decode_error(payload)
    except msgspec.DecodeError:
        return FrameError(f"{subject} sent an undecodable error frame")
    if err.category == "refused":
        return WorkerShuttingDownError(err.message)
    if err.category == "protocol":
        return FrameError(err.message)
    return RemoteError(err.error_type, err.message)


def _cancel_if_running(task: asyncio.Task) -> None:
    if not task.done():
        task.cancel()
