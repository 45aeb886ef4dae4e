"""The request side of every scheduler-driven engine: follow one request's output stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from kvflow.llm.protocol import EngineOutput
from kvflow.runtime.context import Context


class OutputSource(Protocol):
    """What an engine hands a request's generator: batched outputs, the last with a finish reason."""

    def next_output(self) -> Awaitable[EngineOutput]: ...


async def follow_outputs(
    source: OutputSource, cancel: Callable[[], None], context: Context
) -> AsyncIterator[EngineOutput]:
    """Yield `source`'s outputs until one finishes. A stopped context, a consumer that
    goes away, or the end of the stream all call `cancel` (which must be idempotent), so
    the engine aborts the request and frees its blocks at once."""
    context.on_stop(cancel)
    try:
        while True:
            out = await source.next_output()
            yield out
            if out.finish_reason is not None:
                return
    finally:
        context.remove_on_stop(cancel)
        cancel()
