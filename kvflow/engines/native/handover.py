"""From the engine thread to the event loop: each step's stream deliveries, KV events and
load metrics, applied on the loop in order, in one wake-up however many steps it fell behind."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from kvflow.engines.base import EngineHooks
from kvflow.engines.native.stream import Delivery, RequestStream
from kvflow.llm.kv_events import KvEvent, LoadMetrics

Published = tuple[list[KvEvent], LoadMetrics | None]


@dataclass
class Deliveries:
    """One step's output for the streams: plain tokens, and deliveries with more in them."""

    plain: list[tuple[RequestStream, list[int]]]
    full: list[Delivery]


class Handover:
    """`send` on the engine thread; the loop applies what was sent, oldest first.

    `hold` keeps a step's outputs back until `flush` (or the next `send`, which sends them
    first): the engine lets the loop's wake-ups wait until it has launched the next step."""

    def __init__(self, hooks: EngineHooks) -> None:
        self.hooks = hooks
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the engine starts
        self._lock = threading.Lock()
        # Sent and not yet applied; None: no wake-up of the loop is pending.
        self._handed: list[tuple[Deliveries, Published]] | None = None
        self._held: tuple[Deliveries, Published] | None = None  # engine thread only

    def hold(self, deliveries: Deliveries, published: Published) -> None:
        self.flush()
        self._held = (deliveries, published)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._send(*held)

    def send(self, deliveries: Deliveries, published: Published) -> None:
        self.flush()  # what was held goes first: outputs stay in step order
        self._send(deliveries, published)

    def _send(self, deliveries: Deliveries, published: Published) -> None:
        assert self.loop is not None
        if not (deliveries.plain or deliveries.full or published[0] or published[1] is not None):
            return
        with self._lock:  # while the loop has not taken the last batch, join it
            if self._handed is not None:
                self._handed.append((deliveries, published))
                return
            self._handed = [(deliveries, published)]
        self.loop.call_soon_threadsafe(self._apply_handed)

    def publish(self, published: Published) -> None:
        self.send(Deliveries([], []), published)

    def _apply_handed(self) -> None:
        with self._lock:
            handed, self._handed = self._handed or [], None
        for deliveries, (events, metrics) in handed:
            for stream, new in deliveries.plain:
                stream.push_tokens(new)
            for d in deliveries.full:
                d.stream.push(d)
            if events:
                self.hooks.publish_kv_events(events)
            if metrics is not None:
                self.hooks.publish_load(metrics)
