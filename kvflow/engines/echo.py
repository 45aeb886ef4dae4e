"""The echo engine: streams the prompt's tokens back, one per step, with a delay; stops at stop ids."""

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
    # Seconds between tokens. 0 = as fast as possible, but still one event-loop turn per
    # token, so concurrent requests interleave as they would in a batched engine's steps.
    delay: float = 0.0
    # Cycle the prompt until max_tokens (a model that never emits EOS); needs max_tokens.
    repeat: bool = False


class EchoEngine:
    """Returns the prompt tokens one at a time (up to max_tokens; cycling them if `repeat`)."""

    def __init__(self, config: EchoConfig, hooks: EngineHooks) -> None:
        self.config = config
        self.hooks = hooks

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def cache_snapshot(self) -> CacheSnapshot | None:
        return None

    def output_length(self, request: PreprocessedRequest) -> int:
        """How many tokens `request` gets back."""
        prompt, limit = len(request.token_ids), request.stop.max_tokens
        if limit is None:
            return prompt
        return limit if self.config.repeat and prompt else min(limit, prompt)

    def finish_reason(self, request: PreprocessedRequest, n: int) -> str:
        """"length" when max_tokens cut the echo of `n` tokens short, else "stop"."""
        limit, prompt = request.stop.max_tokens, len(request.token_ids)
        cut = limit is not None and n == limit and (n < prompt or (self.config.repeat and prompt > 0))
        return FINISH_LENGTH if cut else FINISH_STOP

    async def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]:
        tokens = request.token_ids
        n = self.output_length(request)
        reason = self.finish_reason(request, n)
        delay = self.config.delay
        stop_ids = set(request.stop.stop_token_ids)
        for i in range(n):
            if context.is_stopped():
                yield EngineOutput(finish_reason=FINISH_CANCELLED)
                return
            await asyncio.sleep(delay)
            token = tokens[i % len(tokens)]
            finish = FINISH_STOP if token in stop_ids else reason if i == n - 1 else None
            yield EngineOutput([token], finish_reason=finish, cached_tokens=0 if i == 0 else None)
            if finish is not None:
                return
        if n == 0:
            yield EngineOutput(finish_reason=reason, cached_tokens=0)


def _add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("echo engine")
    group.add_argument(
        "--echo-delay", type=float, default=0.0, help="seconds between echoed tokens (default: 0)"
    )
    group.add_argument(
        "--echo-repeat",
        action="store_true",
        help="cycle the prompt until max_tokens instead of stopping at its end",
    )


def _build(args: argparse.Namespace, hooks: EngineHooks) -> EchoEngine:
    return EchoEngine(EchoConfig(delay=args.echo_delay, repeat=args.echo_repeat), hooks)


SPEC = register_engine(EngineSpec(name="echo", add_args=_add_args, build=_build))
