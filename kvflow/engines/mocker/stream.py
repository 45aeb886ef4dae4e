"""One request's output stream: tokens the engine loop hands over, awaited by generate().

The engine loop calls `take_new_tokens` / `finish` / `fail` (never blocking); the
request's generator awaits `next_output`, which batches whatever arrived since it
last ran into one EngineOutput. A single future per wait replaces a queue.
"""

from __future__ import annotations

import asyncio

from kvflow.engines.core.sequence import Sequence
from kvflow.engines.mocker.outputs import mock_logprobs
from kvflow.llm.protocol import FINISH_ERROR, EngineOutput


class OutputStream:
    __slots__ = ("_error", "_finish", "_num_taken", "_reported_cache", "_tokens", "_waiter", "logprobs",
                 "seq")

    def __init__(self, seq: Sequence, logprobs: int | None = None) -> None:
        self.seq = seq
        # Top alternatives per token when the request asked for logprobs (None: it did not).
        self.logprobs = logprobs
        self._tokens: list[int] = []
        self._num_taken = seq.num_output_tokens  # a migrated request's earlier outputs
        self._finish: str | None = None
        self._error: str | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reported_cache = False

    @property
    def finished(self) -> bool:
        return self._finish is not None

    def take_new_tokens(self) -> None:
        """Move output tokens the sequence gained since the last call into the buffer."""
        token_ids = self.seq.token_ids
        new = len(token_ids) - self.seq.prompt_len - self._num_taken
        if new > 0:
            self._tokens.extend(token_ids[-new:])
            self._num_taken += new
            self._wake()

    def finish(self, reason: str) -> None:
        if self._finish is None:
            self._finish = reason
            self._wake()

    def fail(self, message: str) -> None:
        if self._finish is None:
            self._error = message
            self.finish(FINISH_ERROR)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def next_output(self) -> EngineOutput:
        """Everything that arrived since the last call (waits if nothing has)."""
        if not self._tokens and self._finish is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        tokens, self._tokens = self._tokens, []
        out = EngineOutput(token_ids=tokens, finish_reason=self._finish, error=self._error)
        if self.logprobs is not None and tokens:
            first = self._num_taken - len(tokens)
            out.logprobs, out.top_logprobs = mock_logprobs(
                tokens, first, self.seq.seed, max(self.logprobs, 1),
                self.seq.token_ids[: self.seq.prompt_len])
        if not self._reported_cache:
            self._reported_cache = True
            out.cached_tokens = max(self.seq.num_cached_tokens, 0)
            out.cached_tokens_by_tier = self.seq.cached_by_tier
            out.kv_transfer = self.seq.kv_transfer
        return out
