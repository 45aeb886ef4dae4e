"""The echo engine: streams the prompt's tokens back (a chat prompt's last message), one per step."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kvflow.engines.base import EngineHooks, EngineSpec, register_engine
from kvflow.llm.kv_events import CacheSnapshot
from kvflow.llm.model_card import resolve_model_path
from kvflow.llm.protocol import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineOutput,
    PreprocessedRequest,
)
from kvflow.llm.tokenizer import Tokenizer
from kvflow.runtime.context import Context
from kvflow.runtime.errors import UserError


@dataclass(frozen=True)
class EchoConfig:
    # Seconds between tokens. 0 = as fast as possible, but still one event-loop turn per
    # token, so concurrent requests interleave as they would in a batched engine's steps.
    delay: float = 0.0
    # Cycle the prompt until max_tokens (a model that never emits EOS); needs max_tokens.
    repeat: bool = False


class EchoEngine:
    """Returns the prompt tokens one at a time (up to max_tokens; cycling them if `repeat`)."""

    def __init__(
        self, config: EchoConfig, hooks: EngineHooks, reply: Callable[[list[int]], list[int]] | None = None
    ) -> None:
        self.config = config
        self.hooks = hooks
        # Which prompt tokens to echo: all (default), or a chat prompt's last message only.
        self.reply = reply or list

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def cache_snapshot(self) -> CacheSnapshot | None:
        return None

    def output_length(self, request: PreprocessedRequest) -> int:
        """How many tokens `request` gets back."""
        prompt, limit = len(self.reply(request.token_ids)), request.stop.max_tokens
        if limit is None:
            return prompt
        return limit if self.config.repeat and prompt else min(limit, prompt)

    def finish_reason(self, request: PreprocessedRequest, n: int) -> str:
        """"length" when max_tokens cut the echo of `n` tokens short, else "stop"."""
        limit, prompt = request.stop.max_tokens, len(self.reply(request.token_ids))
        cut = limit is not None and n == limit and (n < prompt or (self.config.repeat and prompt > 0))
        return FINISH_LENGTH if cut else FINISH_STOP

    async def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]:
        tokens = self.reply(request.token_ids)
        n = self.output_length(request)
        reason = self.finish_reason(request, n)
        delay = self.config.delay
        for i in range(n):
            if context.is_stopped():
                yield EngineOutput(finish_reason=FINISH_CANCELLED)
                return
            await asyncio.sleep(delay)
            last = i == n - 1
            yield EngineOutput(
                [tokens[i % len(tokens)]],
                finish_reason=reason if last else None,
                cached_tokens=0 if i == 0 else None,
            )
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


ROLES = ("system", "user", "assistant", "tool", "developer", "ipython")


class LastMessage:
    """A chat prompt's last message content (no template markup or role names); other prompts whole.

    The prompt is split at the tokenizer's special tokens (the template's markup); segments
    that are only a role name are dropped, and so is a role line opening the last one.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special = tokenizer.special_token_ids

    def __call__(self, ids: list[int]) -> list[int]:
        if not self.special or not any(i in self.special for i in ids):
            return list(ids)
        segments, current = [], []
        for token in ids:
            if token in self.special:
                segments.append(current)
                current = []
            else:
                current.append(token)
        segments.append(current)
        content = [s for s in segments if self.tokenizer.decode(s).strip() not in ("", *ROLES)]
        return self._without_role_line(content[-1]) if content else list(ids)

    def _without_role_line(self, seg: list[int]) -> list[int]:
        for k in range(1, min(len(seg), 8)):
            head = self.tokenizer.decode(seg[:k])
            if head.strip() in ROLES and head.endswith("\n"):
                seg = seg[k:]
                break
        while seg and not self.tokenizer.decode(seg[:1]).strip():
            seg = seg[1:]
        return seg


def _build(args: argparse.Namespace, hooks: EngineHooks) -> EchoEngine:
    config = EchoConfig(delay=args.echo_delay, repeat=args.echo_repeat)
    try:
        reply = LastMessage(Tokenizer.from_dir(resolve_model_path(args.model_path)))
    except (UserError, OSError, ValueError):
        reply = None  # registering the model card reports what is wrong with the path
    return EchoEngine(config, hooks, reply)


register_engine(EngineSpec(name="echo", add_args=_add_args, build=_build))
