"""The bounded FCFS hold for requests that arrive while every worker is busy.

`HoldQueue` is the rule itself, with no event loop: a request is let through at once
when nobody waits and `has_room()` holds; otherwise it waits in arrival order. Whenever
load frees (a first token, a finished request, new load metrics, a worker that joins),
the owner calls `pump()`, which lets the head through if its `has_room()` holds. One
admitted request is routed at a time: its owner calls `done()` after booking its load,
so the next head sees that load. A request that waits longer than `timeout_s` gets a
`RouterOverloadedError`; one whose client left is `abandon`ed.

`AdmissionQueue` is the router's asyncio face of it (a waiter is a future, the timeout
a timer); the trace simulator (`kvflow.replay.sim`) drives the same `HoldQueue` from its
virtual clock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvflow.router.errors import RouterOverloadedError

HasRoom = Callable[[], bool]


@dataclass(eq=False)
class Waiter:
    """One held request: `admit()` when it is its turn, `reject(error)` when it timed out."""

    has_room: HasRoom
    admit: Callable[[], None]
    reject: Callable[[RouterOverloadedError], None]
    admitted: bool = False


@dataclass(frozen=True)
class AdmissionStats:
    waiting: int
    admitted_after_wait: int
    rejected: int
    timed_out: int


class HoldQueue:
    """FCFS hold with a bound on length and on time; no asyncio (see the module doc)."""

    def __init__(self, max_waiting: int, timeout_s: float, retry_after_s: float) -> None:
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._queue: deque[Waiter] = deque()
        self._handing_over = False
        self._pumping = False
        self._admitted_after_wait = self._rejected = self._timed_out = 0

    def can_admit_now(self, has_room: HasRoom) -> bool:
        return not self._queue and not self._handing_over and has_room()

    def try_admit(self, has_room: HasRoom) -> bool:
        """True: route now, then call `done()`. False: the caller must `hold` the request."""
        if not self.can_admit_now(has_room):
            return False
        self._handing_over = True
        return True

    def hold(self, waiter: Waiter) -> None:
        """Queue the waiter behind those already waiting; a full queue raises at once."""
        if len(self._queue) >= self.max_waiting:
            self._rejected += 1
            raise RouterOverloadedError(
                f"all workers are busy and {len(self._queue)} requests already wait for one; "
                f"retry after {self.retry_after_s:g} s or add workers",
                self.retry_after_s,
            )
        self._queue.append(waiter)
        self.pump()  # room may have appeared between try_admit and now

    def time_out(self, waiter: Waiter) -> None:
        """The waiter's `timeout_s` is up: reject it unless it already got its turn."""
        if waiter not in self._queue:
            return
        self._queue.remove(waiter)
        self._timed_out += 1
        waiter.reject(RouterOverloadedError(
            f"all workers stayed busy for {self.timeout_s:g} s while this request waited; "
            f"retry after {self.retry_after_s:g} s or add workers",
            self.retry_after_s,
        ))

    def abandon(self, waiter: Waiter) -> None:
        """The waiter left (its client went away): drop it, or give back the turn it got."""
        if waiter in self._queue:
            self._queue.remove(waiter)
        elif waiter.admitted:
            waiter.admitted = False
            self.done()

    def done(self) -> None:
        """The admitted request is booked (or gave up): let the next one in if it fits."""
        self._handing_over = False
        self.pump()

    def pump(self) -> None:
        """Let heads through, in order, while they fit and nobody is mid hand-over."""
        if self._pumping:
            return  # an admit() that calls done() at once: the loop below goes on
        self._pumping = True
        try:
            while not self._handing_over and self._queue and self._queue[0].has_room():
                head = self._queue.popleft()
                head.admitted = True
                self._handing_over = True
                self._admitted_after_wait += 1
                head.admit()
        finally:
            self._pumping = False

    def waiting(self) -> int:
        return len(self._queue)

    def holds(self, waiter: Waiter) -> bool:
        """Whether the waiter is still in the queue (not admitted, timed out or abandoned)."""
        return waiter in self._queue

    def stats(self) -> AdmissionStats:
        return AdmissionStats(len(self._queue), self._admitted_after_wait, self._rejected,
                              self._timed_out)


class AdmissionQueue(HoldQueue):
    """`HoldQueue` for coroutines: `await admit(has_room)`, then `done()`."""

    async def admit(self, has_room: HasRoom) -> None:
        """Return when the request may be routed; the caller must then call `done()`."""
        if self.try_admit(has_room):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def admit() -> None:
            if not future.done():
                future.set_result(None)

        def reject(error: RouterOverloadedError) -> None:
            if not future.done():
                future.set_exception(error)

        waiter = Waiter(has_room, admit, reject)
        self.hold(waiter)
        if waiter.admitted:
            return
        timer = asyncio.get_running_loop().call_later(self.timeout_s, self.time_out, waiter)
        try:
            await future
        except BaseException:
            self.abandon(waiter)
            raise
        finally:
            timer.cancel()
