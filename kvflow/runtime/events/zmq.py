"""Brokerless ZMQ event plane: each publishing process binds a PUB socket and
registers its address in discovery; subscribers connect a SUB socket to every
registered publisher and follow them as they come and go.

Delivery is best effort (a subscriber that connects late misses earlier events);
KV-event consumers detect gaps by event id and recover by snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import zmq
import zmq.asyncio

from kvflow.runtime.discovery.base import PUT, Discovery
from kvflow.runtime.events.base import EventPlane, Subscription, literal_prefix

log = logging.getLogger(__name__)
PUBLISHERS_PREFIX = "v1/event_publishers/"


class ZmqEventPlane(EventPlane):
    name = "zmq"

    def __init__(self, discovery: Discovery, host: str = "127.0.0.1") -> None:
        super().__init__()
        self.discovery = discovery
        self.host = host
        self._ctx = zmq.asyncio.Context()
        self._pub: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._connected: dict[str, str] = {}
        self._tasks: list[asyncio.Task] = []
        self._pub_lock = asyncio.Lock()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await super().close()
        for sock in (self._pub, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()

    async def _ensure_pub(self) -> zmq.asyncio.Socket:
        async with self._pub_lock:
            if self._pub is None:
                pub = self._ctx.socket(zmq.PUB)
                pub.setsockopt(zmq.SNDHWM, 100_000)
                port = pub.bind_to_random_port(f"tcp://{self.host}")
                self._pub = pub
                key = f"{PUBLISHERS_PREFIX}{self.discovery.lease_id:016x}"
                await self.discovery.put(key, f"tcp://{self.host}:{port}".encode())
            return self._pub

    async def publish(self, subject: str, payload: bytes) -> None:
        pub = self._pub or await self._ensure_pub()
        await pub.send_multipart([subject.encode(), payload])

    def _on_subscribe(self, sub: Subscription) -> None:
        if self._sub is None:
            self._sub = self._ctx.socket(zmq.SUB)
            self._sub.setsockopt(zmq.RCVHWM, 100_000)
            self._tasks.append(asyncio.ensure_future(self._follow_publishers()))
            self._tasks.append(asyncio.ensure_future(self._recv_loop()))
        self._sub.setsockopt(zmq.SUBSCRIBE, literal_prefix(sub.pattern).encode())

    async def _follow_publishers(self) -> None:
        assert self._sub is not None
        async for event in self.discovery.watch_prefix(PUBLISHERS_PREFIX):
            if event.kind == PUT:
                addr = event.value.decode()
                if self._connected.get(event.key) != addr:
                    self._connected[event.key] = addr
                    self._sub.connect(addr)
            else:
                addr = self._connected.pop(event.key, "")
                if addr:
                    with contextlib.suppress(zmq.ZMQError):
                        self._sub.disconnect(addr)

    async def _recv_loop(self) -> None:
        assert self._sub is not None
        while True:
            try:
                subject, payload = await self._sub.recv_multipart()
            except ValueError:
                continue  # not a two-part message: not ours
            self._dispatch(subject.decode(errors="replace"), payload)
