"""Background asyncio tasks: stopping one cleanly."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and wait until it has ended.

    The task's own cancellation is not re-raised; an error it had already failed with
    is. A cancellation of the caller while it waits propagates to the caller (unlike
    `with suppress(CancelledError): await task`, which swallows it too).
    """
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
