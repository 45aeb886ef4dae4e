"""Overload control: a per-model limit on requests in flight, a bounded FIFO queue behind it.

`AdmissionControl.slot(model)` is an async context manager: a request holds one slot of its
model's limit while it runs. When every slot is taken it waits in the model's queue (first
come, first served) for up to `queue_timeout_s`; when the queue is full, or the wait runs
out, it is refused at once with 429 and a Retry-After header, so memory and latency stay
bounded however hard clients push. A freed slot passes straight to the head of the queue.

`EngineOverloaded` is what an engine client raises when the workers themselves are
saturated (the router's own queue is full); the frontend answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from kvflow.frontend.engine_client import EngineUnavailable
from kvflow.frontend.errors import ApiError, too_many_requests
from kvflow.frontend.timeline import current_timeline


class EngineOverloaded(EngineUnavailable):
    """Every worker is busy and the router's queue is full; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class AdmissionLimits:
    """Per model; `max_inflight` 0 means no limit (and then nothing ever queues)."""

    max_inflight: int = 0
    max_queued: int = 0
    queue_timeout_s: float = 30.0
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_inflight < 0 or self.max_queued < 0:
            raise ValueError("max_inflight and max_queued must be >= 0 (0 = no limit / no queue)")
        if self.queue_timeout_s < 0 or self.retry_after_s <= 0:
            raise ValueError("queue_timeout_s must be >= 0 and retry_after_s > 0")


@dataclass(frozen=True)
class GateStats:
    inflight: int
    queued: int


# Called with (model, reason) when a request is refused; reason: "queue_full" | "queue_timeout".
OnReject = Callable[[str, str], None]


class ModelGate:
    """One model's slots and queue. `can_enter()` / `enter()` is the check/act pair."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.inflight = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    def stats(self) -> GateStats:
        return GateStats(self.inflight, len(self._queue))

    def can_enter(self) -> bool:
        limit = self.limits.max_inflight
        return limit == 0 or (self.inflight < limit and not self._queue)

    def enter(self) -> None:
        self.inflight += 1

    def can_queue(self) -> bool:
        return len(self._queue) < self.limits.max_queued

    async def wait(self) -> bool:
        """Queue until a slot is handed over (True, the slot is ours) or the wait times out."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.limits.queue_timeout_s)
            return True
        except asyncio.TimeoutError:
            return self._abandon(future)
        except BaseException:
            if self._abandon(future):
                self.leave()  # handed over while we were being cancelled: pass it on
            raise

    def _abandon(self, future: asyncio.Future[None]) -> bool:
        """Leave the queue; True if a slot was handed to us meanwhile (we then own it)."""
        if future.done():
            return True
        future.cancel()
        if future in self._queue:
            self._queue.remove(future)
        return False

    def leave(self) -> None:
        """Free a slot: hand it to the head of the queue, or return it."""
        while self._queue:
            head = self._queue.popleft()
            if not head.done():
                head.set_result(None)  # the slot moves over; inflight stays the same
                return
        self.inflight -= 1


class AdmissionControl:
    """The gates of every model, created on first use with the same limits."""

    def __init__(self, limits: AdmissionLimits, on_reject: OnReject | None = None) -> None:
        self.limits = limits
        self._gates: dict[str, ModelGate] = {}
        self._on_reject = on_reject

    def gate(self, model: str) -> ModelGate:
        gate = self._gates.get(model)
        if gate is None:
            gate = self._gates[model] = ModelGate(self.limits)
        return gate

    @asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        """Hold one of `model`'s slots for the body; raises ApiError 429 when refused."""
        gate = self.gate(model)
        timeline = current_timeline()
        if timeline is not None:
            timeline.mark_queued()
        if gate.can_enter():
            gate.enter()
        elif not gate.can_queue():
            raise self._refuse(model, "queue_full")
        elif not await gate.wait():
            raise self._refuse(model, "queue_timeout")
        if timeline is not None:
            timeline.mark_admitted()
        try:
            yield
        finally:
            gate.leave()

    def _refuse(self, model: str, reason: str) -> ApiError:
        if self._on_reject is not None:
            self._on_reject(model, reason)
        limits = self.limits
        if reason == "queue_full":
            why = (f"{limits.max_inflight} requests are in flight and {limits.max_queued} "
                   "more are queued")
        else:
            why = (f"it waited {limits.queue_timeout_s:g} s in the queue behind "
                   f"{limits.max_inflight} requests in flight")
        return too_many_requests(
            f"Model '{model}' is overloaded: {why}. Retry after {limits.retry_after_s:g} s.",
            limits.retry_after_s,
        )
