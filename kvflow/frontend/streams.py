"""ChoiceStreams: run one engine request per choice and merge their outputs in arrival order.

With one choice the engine iterator is handed out as it is (no task, no queue, no
extra hop). With n choices each runs in its own task with its own child Context, so a
stop string on one choice stops only that engine request; stopping the parent context
stops them all. Merged outputs carry their choice in `EngineOutput.index`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvflow.frontend.engine_client import EngineClient
from kvflow.frontend.preprocess import ChoiceInput
from kvflow.llm.protocol import EngineOutput
from kvflow.runtime.context import Context


@dataclass(slots=True)
class _Ended:
    """Queue item: choice `index`'s engine stream ended (with `error` if it raised)."""

    index: int
    error: BaseException | None = None


class ChoiceStreams:
    """`async for out in streams` yields every choice's outputs; `stop(i)` ends one.

    With a single choice, iteration may go on after `stop`/`finished`: the caller ignores
    what follows (its processor has finished) and `aclose()` releases the engine request.
    """

    def __init__(self, engine: EngineClient, choices: list[ChoiceInput], context: Context) -> None:
        self._engine = engine
        self._choices = choices
        self._context = context
        self._active = {c.index for c in choices}
        self._tasks: list[asyncio.Task] = []
        self._contexts: dict[int, Context] = {}
        self._single: AsyncIterator[EngineOutput] | None = None

    def __aiter__(self) -> AsyncIterator[EngineOutput]:
        if len(self._choices) == 1:
            self._single = self._engine.generate(self._choices[0].engine_request, self._context)
            return self._single
        return self._run_many()

    def finished(self, index: int) -> None:
        """Choice `index` has its finish reason: ignore anything more its engine sends."""
        self._active.discard(index)

    def stop(self, index: int) -> None:
        """Stop choice `index`: its engine request is told to stop and its outputs end here."""
        self._active.discard(index)
        if len(self._choices) == 1:
            self._context.stop_generating()
        elif index in self._contexts:
            self._contexts[index].stop_generating()

    async def aclose(self) -> None:
        """Release every engine request still running (idempotent)."""
        if self._single is not None:
            single, self._single = self._single, None
            with contextlib.suppress(Exception):
                await single.aclose()  # type: ignore[attr-defined]
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _run_many(self) -> AsyncIterator[EngineOutput]:
        queue: asyncio.Queue[EngineOutput | _Ended] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for choice in self._choices:
            child = Context(choice.engine_request.request_id)
            self._context.on_stop(child.stop_generating)
            self._contexts[choice.index] = child
            self._tasks.append(loop.create_task(self._pump(choice, child, queue)))
        active = self._active
        while active:
            item = await queue.get()
            if isinstance(item, _Ended):
                if item.error is not None and item.index in active:
                    raise item.error
                active.discard(item.index)
            elif item.index in active:
                yield item

    async def _pump(self, choice: ChoiceInput, context: Context, queue: asyncio.Queue) -> None:
        error: BaseException | None = None
        try:
            async for out in self._engine.generate(choice.engine_request, context):
                out.index = choice.index
                queue.put_nowait(out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            queue.put_nowait(_Ended(choice.index, error))
