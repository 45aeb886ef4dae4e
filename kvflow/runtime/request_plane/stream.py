"""The caller's side of one stream: the async iterator `Client.round_robin` & co. return.

The connection delivers frames into a `_StreamState` (it holds no reference to the
consumer), so dropping a `ResponseStream` is enough to cancel the remote handler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec

from kvflow.runtime import codec
from kvflow.runtime.errors import (
    NoInstancesError,
    StreamTimeoutError,
    WorkerShuttingDownError,
    WorkerUnavailableError,
)
from kvflow.runtime.request_plane.tcp_client import StreamSink

if TYPE_CHECKING:
    from kvflow.runtime.request_plane.tcp_client import ClientConnection


class _StreamState(StreamSink):
    """What the connection delivers into; holds no reference to the consumer."""

    __slots__ = ("done", "error", "items", "waiter")

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.waiter: asyncio.Future | None = None
        self.done = False
        self.error: Exception | None = None

    def on_data(self, payload: bytes) -> None:
        self.items.append(payload)
        w = self.waiter
        if w is not None:
            self.waiter = None  # one wake-up per wait, however many items arrive
            if not w.done():
                w.set_result(None)

    def on_end(self) -> None:
        self.done = True
        self._wake()

    def on_error(self, exc: Exception) -> None:
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class ResponseStream:
    """The async iterator a caller gets back; decodes responses lazily.

    Breaking out of `async for` (the stream is dropped), cancelling the consuming
    task, `aclose()`, or the caller's Context stopping all send a CANCEL frame to
    the worker. The connection only references the inner state, so dropping this
    object is enough to cancel.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_conn",
        "_decoder",
        "_opener",
        "_st",
        "_stream_id",
        "_timeout",
        "context",
        "instance_id",
        "received",
    )

    def __init__(
        self, decoder: msgspec.msgpack.Decoder, opener: Any, context: Any, timeout: float | None
    ) -> None:
        self._decoder = decoder
        self._opener = opener  # async callable(stream, retry: bool) -> None; calls attach()
        self._conn: ClientConnection | None = None
        self._stream_id = 0
        self._st = _StreamState()
        self._closed = False
        self._timeout = timeout
        self.context = context
        self.instance_id: int | None = None
        self.received = 0
        if context is not None:
            context.on_stop(self._cancel_remote)

    @property
    def error(self) -> Exception | None:
        return self._st.error

    def attach(self, conn: ClientConnection, instance_id: int, header: codec.RequestHeader) -> None:
        self._st = _StreamState()
        self._conn, self.instance_id = conn, instance_id
        self._stream_id = conn.open_stream(self._st, header)

    # -- consumer side ---------------------------------------------------------------
    def __aiter__(self) -> ResponseStream:
        return self

    def __await__(self) -> Any:
        return self._open_and_return().__await__()

    async def _open_and_return(self) -> ResponseStream:
        if self._conn is None and self._opener is not None:
            await self._open(retry=False)
        return self

    async def _open(self, retry: bool) -> None:
        opener, self._opener = self._opener, None
        await opener(self, retry)
        self._opener = opener

    async def __anext__(self) -> Any:
        st = self._st
        if not st.items:  # the slow path; a response already here needs no wait
            st = await self._next_ready()
        self.received += 1
        self._conn.consumed()  # type: ignore[union-attr]
        return self._decoder.decode(st.items.popleft())

    async def _next_ready(self) -> _StreamState:
        """Open the stream if need be, then wait for a response; raise at the end."""
        if self._conn is None and self._opener is not None:
            await self._open(retry=False)
        while True:
            st = self._st
            if st.items:
                return st
            if st.error is not None:
                await self._on_stream_error(st.error)
                continue
            if st.done or self._closed:
                self._finish()
                raise StopAsyncIteration
            await self._wait(st)

    async def _wait(self, st: _StreamState) -> None:
        st.waiter = asyncio.get_running_loop().create_future()
        try:
            if self._timeout:
                await asyncio.wait_for(st.waiter, self._timeout)
            else:
                await st.waiter
        except asyncio.TimeoutError:
            self._cancel_remote()
            raise StreamTimeoutError(
                f"no response within {self._timeout}s after {self.received} responses"
            ) from None
        except asyncio.CancelledError:
            self._cancel_remote()
            raise
        finally:
            st.waiter = None

    async def _on_stream_error(self, exc: Exception) -> None:
        retryable = isinstance(exc, WorkerUnavailableError) and self.received == 0
        if retryable and self._opener is not None and not self._stopped():
            try:
                await self._open(retry=True)
            except NoInstancesError as none_left:
                self._finish()
                raise type(exc)(f"{exc}; no other instance to retry on ({none_left})",
                                responses_received=0, instance_id=self.instance_id) from exc
            return
        self._finish()
        if isinstance(exc, WorkerUnavailableError) and not isinstance(exc, WorkerShuttingDownError):
            raise type(exc)(
                f"{exc} after {self.received} responses",
                responses_received=self.received,
                instance_id=self.instance_id,
            )
        raise exc

    def _stopped(self) -> bool:
        return self.context is not None and self.context.is_stopped()

    def _finish(self) -> None:
        self._closed = True
        self._opener = None
        if self.context is not None:
            self.context.remove_on_stop(self._cancel_remote)
        if self._conn is not None:
            self._conn.release(self._stream_id)

    def _cancel_remote(self) -> None:
        conn, st = self._conn, self._st
        if conn is not None:
            if not st.done and st.error is None and not self._closed:
                conn.cancel_stream(self._stream_id)
            if st.items:
                conn.consumed(len(st.items))
                st.items.clear()
        self._closed = True
        self._opener = None

    async def aclose(self) -> None:
        self._cancel_remote()

    @property
    def waiting(self) -> bool:
        """Whether the consumer is waiting for the worker's next response right now."""
        return self._st.waiter is not None

    def abandon(self, exc: Exception) -> None:
        """Give up on the stream from outside (its worker stalled): CANCEL it on the worker,
        so it frees the request when it wakes, and end the consumer's wait with `exc`."""
        if self._closed:
            return
        self._cancel_remote()
        self._st.on_error(exc)

    def __del__(self) -> None:
        # A consumer that broke out of `async for` drops its last reference here.
        if not self._closed and self._conn is not None and not self._conn.closed:
            with contextlib.suppress(Exception):
                self._cancel_remote()
