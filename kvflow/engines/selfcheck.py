"""Worker start-up self-checks: KV events reach the event plane, block sizes agree.

A worker whose engine promises KV events subscribes to its own events; if none
arrives within `timeout` seconds of its first request it logs a loud warning
naming the likely cause and sets `kvflow_worker_missing_kv_events{worker_id}`
to 1. A KV-aware router without those events routes blind, so this must not be
silent. The block size the engine actually uses must equal the model card's.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from prometheus_client import CollectorRegistry, Gauge

from kvflow.llm.kv_events import KV_EVENTS_SUBJECT, KvEventBatch
from kvflow.runtime.errors import KvflowError
from kvflow.runtime.events.base import ScopedEvents

log = logging.getLogger(__name__)

DEFAULT_EVENTS_TIMEOUT = 30.0
PROBE_SUBJECT = "kv_events_selfcheck"
GENERIC_HINT = "the engine's KV event publisher is off or not relayed to the event plane"


class BlockSizeMismatchError(KvflowError):
    """The engine's KV block size differs from the one in the model card."""


def check_block_size(engine_block_size: int, card_block_size: int) -> None:
    if engine_block_size != card_block_size:
        raise BlockSizeMismatchError(
            f"the engine uses KV blocks of {engine_block_size} tokens but the model card says "
            f"{card_block_size}; routers would hash prompts wrongly. Make them agree "
            "(set the engine's block size, or leave the card's unset so it follows the engine)."
        )


def missing_gauge(registry: CollectorRegistry) -> Gauge:
    return Gauge(
        "kvflow_worker_missing_kv_events",
        "1 when a worker promised KV events but none reached the event plane after its first request",
        ["worker_id"], registry=registry,
    )


class KvEventSelfCheck:
    """Watches the event plane for this worker's own KV events after its first request."""

    def __init__(
        self, events: ScopedEvents, worker_id: int, gauge: Gauge,
        hint: str = GENERIC_HINT, timeout: float = DEFAULT_EVENTS_TIMEOUT,
    ) -> None:
        self.worker_id = worker_id
        self.gauge = gauge.labels(f"{worker_id:x}")
        self.hint = hint
        self.timeout = timeout
        self.seen = asyncio.Event()
        self._sub = events.subscribe(KV_EVENTS_SUBJECT)
        self._decode = msgspec.msgpack.Decoder(KvEventBatch).decode
        # Publish once now so a brokerless plane (zmq) has this process's publisher
        # registered and its own subscriber connected before the first real event.
        self._tasks = [asyncio.ensure_future(self._listen()),
                       asyncio.ensure_future(events.publish(PROBE_SUBJECT, b""))]

    def on_request(self) -> None:
        """Call for every request; the first one starts the clock."""
        if len(self._tasks) == 2:
            self._tasks.append(asyncio.ensure_future(self._watch()))

    async def _listen(self) -> None:
        async for payload in self._sub:
            if self._decode(payload).worker_id == self.worker_id:
                self.seen.set()
                self.gauge.set(0)
                self._sub.close()
                return

    async def _watch(self) -> None:
        try:
            await asyncio.wait_for(self.seen.wait(), self.timeout)
        except asyncio.TimeoutError:
            self.gauge.set(1)
            log.warning(
                "!!! KV EVENTS MISSING: worker %x promised KV events but none reached the event "
                "plane within %.0f s of its first request; KV-aware routing is blind to this "
                "worker. Likely cause: %s.", self.worker_id, self.timeout, self.hint,
            )

    def close(self) -> None:
        self._sub.close()
        for task in self._tasks:
            task.cancel()
