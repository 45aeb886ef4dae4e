"""The contract for engines that wrap another runtime (vLLM, SGLang, ...), and its glue to the worker.

An adapter builds its runtime from CLI args, starts it and reports what it runs
with (`EngineInfo`), streams `EngineOutput`s, aborts a request by id, answers a
health probe, cleans up, and relays the runtime's KV events through the
`EngineHooks` it was built with. The worker owns registration, cancellation
(it calls `abort` when a request's context stops or its stream is dropped),
drain and metrics; `adapter_spec` turns an adapter class into an `EngineSpec`.
"""

from __future__ import annotations

import abc
import argparse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

from kvflow.engines.base import EngineHooks, EngineSpec
from kvflow.llm.kv_events import CacheSnapshot
from kvflow.llm.protocol import FINISH_CANCELLED, EngineOutput, PreprocessedRequest
from kvflow.runtime.context import Context


@dataclass(frozen=True)
class EngineInfo:
    """What a started engine actually runs with; the worker registers from this."""

    context_length: int
    kv_block_size: int
    total_kv_blocks: int
    max_batch: int
    publishes_kv_events: bool


class EngineAdapter(abc.ABC):
    """Base class for an engine wrapping another runtime, one instance per worker instance."""

    name: ClassVar[str]

    def __init__(self, hooks: EngineHooks) -> None:
        self.hooks = hooks
        self.info: EngineInfo | None = None

    @classmethod
    @abc.abstractmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add this engine's flags to `kvflow worker`'s parser."""

    @classmethod
    @abc.abstractmethod
    def from_args(cls, ns: argparse.Namespace, hooks: EngineHooks) -> EngineAdapter:
        """Build (not start) the engine from parsed args."""

    @abc.abstractmethod
    async def start_engine(self) -> EngineInfo:
        """Start the wrapped runtime and report what it runs with."""

    @abc.abstractmethod
    def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]:
        """Stream the request's outputs; the last one carries a finish_reason."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request and free what it holds; a no-op for unknown ids."""

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Stop the wrapped runtime and its relays."""

    def events_hint(self) -> str:
        """The likely cause, named in the self-check's warning, when no KV event arrives."""
        return "the engine's KV event publisher is off or its relay is not connected"

    async def health(self) -> bool:
        """True while the wrapped runtime can serve."""
        return self.info is not None

    # The `Engine` protocol, in terms of the methods above.

    async def start(self) -> None:
        self.info = await self.start_engine()

    async def stop(self) -> None:
        await self.cleanup()

    def cache_snapshot(self) -> CacheSnapshot | None:
        return None


async def served_generate(
    adapter: EngineAdapter, request: PreprocessedRequest, context: Context
) -> AsyncIterator[EngineOutput]:
    """The worker's generate handler for an adapter: aborts on a stopped context or a dropped stream."""
    finished = False
    stream = adapter.generate(request, context)
    try:
        async for out in stream:
            if context.is_stopped():
                yield EngineOutput(finish_reason=FINISH_CANCELLED)
                return
            finished = out.finish_reason is not None
            yield out
            if finished:
                return
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        if not finished:
            await adapter.abort(request.request_id)


def adapter_spec(cls: type[EngineAdapter]) -> EngineSpec:
    """The `EngineSpec` (registry entry, entry-point target) for an adapter class."""
    return EngineSpec(name=cls.name, add_args=cls.add_args, build=cls.from_args)
