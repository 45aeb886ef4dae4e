"""Per-request context: id and cooperative cancellation shared by caller and handler."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable


class Context:
    """Carries a request id and a stop flag across the request plane.

    The caller's `stop_generating()` reaches the remote handler's context within one
    network round trip; a handler polls `is_stopped()` between steps or awaits
    `stopped()`. Callbacks registered with `on_stop` run once, on the first stop.
    """

    __slots__ = ("_callbacks", "_event", "_stopped", "request_id")

    def __init__(self, request_id: str | None = None) -> None:
        self.request_id = request_id or uuid.uuid4().hex
        self._stopped = False
        self._event: asyncio.Event | None = None
        self._callbacks: list[Callable[[], None]] = []

    def is_stopped(self) -> bool:
        return self._stopped

    def stop_generating(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._event is not None:
            self._event.set()
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    async def stopped(self) -> None:
        """Wait until the request is stopped."""
        if self._stopped:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the context stops (at once if it already has)."""
        if self._stopped:
            callback()
        else:
            self._callbacks.append(callback)

    def remove_on_stop(self, callback: Callable[[], None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def __repr__(self) -> str:
        return f"Context({self.request_id!r}, stopped={self._stopped})"
