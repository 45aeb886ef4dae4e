"""One request's output stream on the asyncio side: what the engine thread delivered, awaited by generate().

The engine thread never touches a stream directly: it builds `Delivery` values and the
event loop applies them (`call_soon_threadsafe`). `next_output` batches whatever arrived
since the generator last ran into one EngineOutput.

With a stream interval N > 1 (`--stream-interval`) plain tokens wake the generator only
once N of them are waiting; the first output, a finish, an error or an embedding wakes it
at once. Tokens are the same, in fewer and larger outputs: at large batches each wake-up
of a request's task is most of the event loop's work per step. The second output waits
for `phase` tokens (1..N, the engine deals them out in turn), so requests that started
together do not all wake on the same step: each step wakes about 1/N of a full batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kvflow.llm.protocol import FINISH_ERROR, EngineOutput, KvTransferStats, TopLogprob


@dataclass
class Delivery:
    """New tokens (and their logprobs) for one request's stream from one engine step."""

    stream: RequestStream
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int | None = None  # prompt tokens the prefix cache served (first delivery)
    cached_by_tier: dict[str, int] | None = None  # of those, per KV tier (first delivery)
    kv_transfer: KvTransferStats | None = None  # KV pulled from a prefill worker (first delivery)
    embedding: list[float] | None = None  # an embedding request's result


class RequestStream:
    """Buffers deliveries for one request until its generator asks for them."""

    def __init__(self, request_id: str, want_logprobs: bool, interval: int = 1,
                 phase: int | None = None) -> None:
        if not 1 <= (phase or interval) <= interval:
            raise ValueError(f"phase {phase} is not in 1..{interval}")
        self.request_id = request_id
        self.want_logprobs = want_logprobs
        self.interval = interval  # plain tokens that wake the generator (see the module doc)
        self.phase = phase or interval  # plain tokens that wake it for the second output
        self._need = 1  # plain tokens that wake it next: the first output goes at once
        self.cached_tokens = 0
        self.cached_by_tier: dict[str, int] | None = None
        self.kv_transfer: KvTransferStats | None = None
        self._tokens: list[int] = []
        self._logprobs: list[float] = []
        self._top: list[list[TopLogprob]] = []
        self._finish: str | None = None
        self._error: str | None = None
        self._embedding: list[float] | None = None
        self._reported_cache = False
        # Only plain tokens to hand out: the first output went, nothing ended, no logprobs.
        self._quiet = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def finished(self) -> bool:
        return self._finish is not None

    def push(self, d: Delivery) -> None:
        if self._finish is not None:
            return  # cancelled meanwhile: drop late tokens
        self._tokens += d.token_ids
        if d.logprobs is not None:
            self._logprobs += d.logprobs
        if d.top_logprobs is not None:
            self._top += d.top_logprobs
        if d.error is not None:
            self._error = d.error
        if d.cached_tokens is not None:
            self.cached_tokens = d.cached_tokens
            self.cached_by_tier = d.cached_by_tier
            self.kv_transfer = d.kv_transfer
        if d.embedding is not None:
            self._embedding = d.embedding
        if d.finish_reason is not None:
            self._finish = d.finish_reason
        if self._finish is not None or self._error is not None or self._embedding is not None:
            self._quiet = False
        if self._due():
            self._wake()

    def push_tokens(self, token_ids: list[int]) -> None:
        """`push` of a Delivery that holds only tokens (the hot path of large batches)."""
        if self._finish is None:
            self._tokens += token_ids
            waiter = self._waiter
            if waiter is not None and len(self._tokens) >= self._need:  # `_due`, `_wake` inline
                self._waiter = None
                if not waiter.done():
                    waiter.set_result(None)

    def finish(self, reason: str) -> None:
        if self._finish is None:
            self._finish = reason
            self._quiet = False
            self._wake()

    def fail(self, message: str) -> None:
        if self._finish is None:
            self._error = message
            self.finish(FINISH_ERROR)

    def _due(self) -> bool:
        """Whether the generator has something to take now (see the module doc)."""
        return (len(self._tokens) >= self._need or self._finish is not None
                or self._error is not None or self._embedding is not None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_output(self) -> EngineOutput:
        """Everything that arrived since the last call (waits if nothing has)."""
        if not self._due():
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self._quiet:  # the hot path: tokens and nothing else to report
            tokens, self._tokens = self._tokens, []
            self._need = self.interval
            return EngineOutput(tokens)
        out = EngineOutput(token_ids=self._tokens, finish_reason=self._finish, error=self._error,
                           embedding=self._embedding)
        self._tokens, self._embedding = [], None
        self._need = self.interval if self._reported_cache else self.phase
        if self.want_logprobs:
            out.logprobs, out.top_logprobs = self._logprobs, self._top
            self._logprobs, self._top = [], []
        if not self._reported_cache:
            self._reported_cache = True
            self._quiet = not self.want_logprobs and self._finish is None and self._error is None
            out.cached_tokens = self.cached_tokens
            out.cached_tokens_by_tier = self.cached_by_tier
            out.kv_transfer = self.kv_transfer
        return out
