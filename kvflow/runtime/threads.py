"""Blocking work on daemon threads: awaited like `to_thread`, never waited for at process exit."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_daemon_thread(fn: Callable[..., T], *args: Any, name: str = "kvflow-blocking") -> T:
    """Run `fn(*args)` on a new daemon thread and await its result.

    Unlike the loop's default executor, `asyncio.run` does not join this thread on
    exit: a signal that ends the process while a model loads (or `input()` waits)
    ends it at once. Cancelling the await abandons the thread's result.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(deliver, future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(deliver, future.set_result, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
