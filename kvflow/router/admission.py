"""The bounded FCFS wait queue for requests that arrive while every worker is busy.

`admit(has_room)` returns at once when nobody waits and `has_room()` holds; otherwise
the caller queues. Whenever load frees, the router calls `pump()`, which wakes the head
of the queue if its `has_room()` holds. One woken request is routed at a time: it must
call `done()` after booking its load, so the next head sees that load.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvflow.router.errors import RouterOverloadedError

HasRoom = Callable[[], bool]


@dataclass
class _Waiter:
    has_room: HasRoom
    future: asyncio.Future[None]


@dataclass(frozen=True)
class AdmissionStats:
    waiting: int
    admitted_after_wait: int
    rejected: int
    timed_out: int


class AdmissionQueue:
    def __init__(self, max_waiting: int, timeout_s: float, retry_after_s: float) -> None:
        self._max_waiting = max_waiting
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._queue: deque[_Waiter] = deque()
        self._handing_over = False
        self._admitted_after_wait = self._rejected = self._timed_out = 0

    def can_admit_now(self, has_room: HasRoom) -> bool:
        return not self._queue and not self._handing_over and has_room()

    async def admit(self, has_room: HasRoom) -> None:
        """Return when the request may be routed; the caller must then call `done()`."""
        if self.can_admit_now(has_room):
            self._handing_over = True
            return
        if len(self._queue) >= self._max_waiting:
            self._rejected += 1
            raise RouterOverloadedError(
                f"all workers are busy and {len(self._queue)} requests already wait for one; "
                f"retry after {self._retry_after_s:g} s or add workers",
                self._retry_after_s,
            )
        await self._wait(_Waiter(has_room, asyncio.get_running_loop().create_future()))

    async def _wait(self, waiter: _Waiter) -> None:
        self._queue.append(waiter)
        timer = asyncio.get_running_loop().call_later(self._timeout_s, self._time_out, waiter)
        try:
            await waiter.future
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            timer.cancel()
        self._admitted_after_wait += 1

    def _time_out(self, waiter: _Waiter) -> None:
        if waiter not in self._queue:
            return
        self._queue.remove(waiter)
        self._timed_out += 1
        waiter.future.set_exception(RouterOverloadedError(
            f"all workers stayed busy for {self._timeout_s:g} s while this request waited; "
            f"retry after {self._retry_after_s:g} s or add workers",
            self._retry_after_s,
        ))

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter left (cancelled, timed out): give its turn back if it had been given one."""
        if waiter in self._queue:
            self._queue.remove(waiter)
            return
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self.done()

    def done(self) -> None:
        """The admitted request is booked (or gave up): let the next one in if it fits."""
        self._handing_over = False
        self.pump()

    def pump(self) -> None:
        """Wake the head of the queue if it fits now and nobody is mid hand-over."""
        if self._handing_over or not self._queue:
            return
        head = self._queue[0]
        if head.has_room():
            self._queue.popleft()
            self._handing_over = True
            head.future.set_result(None)

    def waiting(self) -> int:
        return len(self._queue)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(len(self._queue), self._admitted_after_wait, self._rejected,
                              self._timed_out)
