"""The echo engine: streams the prompt's tokens back, one per step, with a delay."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvflow.engines.base import EngineHooks, EngineSpec, register_engine
from kvflow.llm.kv_events import CacheSnapshot
from kvflow.llm.protocol import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineOutput,
    PreprocessedRequest,
)
from kvflow.runtime.context import Context


@dataclass(frozen=True)
class EchoConfig:
    delay: float = 0.0  # seconds between tokens; 0 = as fast as possible


class EchoEngine:
    """Returns the prompt tokens one at a time (up to max_tokens)."""

    def __init__(self, config: EchoConfig, hooks: EngineHooks) -> None:
        self.config = config
        self.hooks = hooks

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def cache_snapshot(self) -> CacheSnapshot | None:
        return None

    async def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]:
        tokens = request.token_ids
        limit = request.stop.max_tokens
        n = len(tokens) if limit is None else min(limit, len(tokens))
        delay = self.config.delay
        for i in range(n):
            if context.is_stopped():
                yield EngineOutput(finish_reason=FINISH_CANCELLED)
                return
            if delay:
                await asyncio.sleep(delay)
            last = i == n - 1
            reason = (FINISH_LENGTH if n < len(tokens) else FINISH_STOP) if last else None
            yield EngineOutput([tokens[i]], finish_reason=reason, cached_tokens=0 if i == 0 else None)
        if n == 0:
            yield EngineOutput(finish_reason=FINISH_LENGTH if tokens else FINISH_STOP, cached_tokens=0)


def _add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("echo engine")
    group.add_argument(
        "--echo-delay", type=float, default=0.0, help="seconds between echoed tokens (default: 0)"
    )


def _build(args: argparse.Namespace, hooks: EngineHooks) -> EchoEngine:
    return EchoEngine(EchoConfig(delay=args.echo_delay), hooks)


register_engine(EngineSpec(name="echo", add_args=_add_args, build=_build))
