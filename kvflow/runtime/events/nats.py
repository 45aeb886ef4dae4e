"""NATS event plane: kvflow subjects are NATS subjects, with the same '*' / '>' wildcards.

One nats-py connection per plane that reconnects forever; nats-py re-sends every
subscription after a reconnect, so subscribers receive again once the server is back.
Delivery is at most once: events published while no server is reachable wait in
nats-py's outbound buffer (`pending_bytes`) and are dropped, and counted in `dropped`,
once it is full. KV-event consumers detect gaps by event id and recover by snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from kvflow.runtime.errors import KvflowError
from kvflow.runtime.events.base import EventPlane, Subscription

log = logging.getLogger(__name__)

DEFAULT_PENDING_BYTES = 8 * 1024 * 1024
NATS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, OSError, asyncio.TimeoutError)


class NatsUnavailableError(KvflowError):
    """No NATS server answered at the configured URL."""


async def connect_nats(url: str, name: str, *, connect_timeout: float = 5.0,
                       reconnect_wait: float = 0.25, pending_bytes: int = DEFAULT_PENDING_BYTES,
                       ) -> NatsClient:
    """A nats-py connection that reconnects forever; fails fast with a clear error at start."""
    nc = NatsClient()

    async def on_error(exc: Exception) -> None:
        log.debug("nats %s: %s", name, exc)

    async def on_disconnect() -> None:
        if not nc.is_closed:
            log.warning("nats %s: disconnected from %s; reconnecting", name, url)

    async def on_reconnect() -> None:
        log.info("nats %s: reconnected to %s", name, url)

    try:
        await asyncio.wait_for(nc.connect(
            servers=[s.strip() for s in url.split(",") if s.strip()], name=name,
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=reconnect_wait,
            connect_timeout=connect_timeout, pending_size=pending_bytes, error_cb=on_error,
            disconnected_cb=on_disconnect, reconnected_cb=on_reconnect), connect_timeout)
    except (*NATS_ERRORS, ValueError) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        raise NatsUnavailableError(
            f"cannot reach NATS at {url} within {connect_timeout}s ({exc or type(exc).__name__}); "
            f"start nats-server or point --nats-url (KVFLOW_NATS_URL) at a running one") from exc
    return nc


class NatsEventPlane(EventPlane):
    name = "nats"

    def __init__(self, url: str, *, connect_timeout: float = 5.0, reconnect_wait: float = 0.25,
                 pending_bytes: int = DEFAULT_PENDING_BYTES) -> None:
        super().__init__()
        self.url = url
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.pending_bytes = pending_bytes
        self.dropped = 0
        self._nc: NatsClient | None = None
        self._connected = asyncio.Event()
        self._nats_subs: dict[Subscription, NatsSubscription] = {}
        self._subscribing: set[asyncio.Task] = set()
        self._drop_logged = False

    async def start(self) -> None:
        self._nc = await connect_nats(self.url, "kvflow-events", connect_timeout=self.connect_timeout,
                                      reconnect_wait=self.reconnect_wait,
                                      pending_bytes=self.pending_bytes)
        self._connected.set()

    async def close(self) -> None:
        await super().close()
        await asyncio.gather(*self._subscribing, return_exceptions=True)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 2.0)
        self._nc = None

    async def ready(self) -> None:
        """Wait until every subscription made so far is known to the server."""
        await asyncio.gather(*self._subscribing)
        if self._nc is not None and self._nc.is_connected:
            await self._nc.flush()

    # -- publish -----------------------------------------------------------------------
    async def publish(self, subject: str, payload: bytes) -> None:
        if self._subscribing:  # our own subscriptions go first, so we hear our own events
            await asyncio.gather(*self._subscribing, return_exceptions=True)
        nc = self._nc
        if nc is None:
            raise RuntimeError("NatsEventPlane.publish before start(); call `await plane.start()` first")
        try:
            await nc.publish(subject, payload)
        except NATS_ERRORS as exc:
            self._count_drop(subject, exc)

    def _count_drop(self, subject: str, exc: BaseException) -> None:
        self.dropped += 1
        if not self._drop_logged:
            self._drop_logged = True
            log.warning("nats events: dropping events (first on %s: %s); NATS at %s is unreachable "
                        "and the outbound buffer is full", subject, exc or type(exc).__name__, self.url)

    # -- subscribe -----------------------------------------------------------------------
    def _on_subscribe(self, sub: Subscription) -> None:
        task = asyncio.ensure_future(self._nats_subscribe(sub))
        self._subscribing.add(task)
        task.add_done_callback(self._subscribing.discard)

    async def _nats_subscribe(self, sub: Subscription) -> None:
        await self._connected.wait()
        assert self._nc is not None

        async def deliver(msg: Msg) -> None:
            sub.deliver(msg.subject, msg.data)

        nats_sub = await self._nc.subscribe(sub.pattern, cb=deliver)
        if sub in self._subs:
            self._nats_subs[sub] = nats_sub
        else:  # closed while we were subscribing
            await self._nats_unsubscribe(nats_sub)

    def _unsubscribe(self, sub: Subscription) -> None:
        super()._unsubscribe(sub)
        nats_sub = self._nats_subs.pop(sub, None)
        if nats_sub is not None:
            task = asyncio.ensure_future(self._nats_unsubscribe(nats_sub))
            self._subscribing.add(task)
            task.add_done_callback(self._subscribing.discard)

    @staticmethod
    async def _nats_unsubscribe(nats_sub: NatsSubscription) -> None:
        with contextlib.suppress(*NATS_ERRORS):
            await nats_sub.unsubscribe()
