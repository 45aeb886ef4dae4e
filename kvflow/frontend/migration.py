"""Request migration: when a request's worker is lost mid-stream, continue it on another one.

`MigratingClient` wraps an engine client whose `generate` takes `exclude` (worker ids not
to route to) and raises `WorkerLost` when the worker dies, its connection drops, or it
refuses the stream while draining. The request is then sent again, to another worker,
as the continuation of what the client has already received:

    token_ids           prompt + every token streamed so far
    max_tokens          reduced by the tokens streamed so far (min_tokens likewise)
    prior_output_tokens how many of token_ids were generated (engines may continue there)

so the client sees one stream with no token missing or repeated. Each lost worker is
excluded for the rest of the request (discovery drops it within the lease TTL).

Which requests can be continued, and which fail with a clear error instead:

- continued exactly: greedy requests (temperature 0) — the next token depends only on the
  tokens before it — and anything lost before its first token (it is simply re-sent);
- continued as a valid sample: unseeded sampling, n > 1 (every choice is its own engine
  request and moves on its own), logprobs, stop strings / stop token ids, min_tokens;
- refused once tokens were streamed, because the state they depend on lives only on the
  lost worker: a sampling `seed` with temperature other than 0 (the seeded random stream
  cannot be re-created at the same position elsewhere, so the output would no longer be
  the one the seed promises), guided decoding (`response_format`: the grammar's state is
  not carried over), presence / frequency penalties (they count only generated tokens,
  which the new worker sees as prompt), and requests pinned to a worker or carrying
  disaggregation state (`routing.worker_id` / `routing.disagg`).

A request that loses more than `limit` workers fails too. Failures raise
`MigrationFailed` (an EngineUnavailable): the frontend answers 503, or ends the stream
with an error event, with a message that says what happened and that a retry works.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import Protocol

import msgspec

from kvflow.frontend.engine_client import EngineUnavailable
from kvflow.llm.protocol import FINISH_LENGTH, EngineOutput, PreprocessedRequest
from kvflow.runtime.context import Context

log = logging.getLogger(__name__)

class WorkerLost(EngineUnavailable):
    """The worker serving a request went away (`worker_id`, when known)."""

    def __init__(self, message: str, worker_id: int | None, *, stalled: bool = False) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.stalled = stalled  # it hung (frontend.stalls) rather than dropped


class MigrationFailed(EngineUnavailable):
    """A lost request could not be continued elsewhere; the message says why."""


class ExcludingClient(Protocol):
    """An engine client that can route around workers (see RoutedEngineClient)."""

    def generate(
        self, request: PreprocessedRequest, context: Context, exclude: Collection[int] = ()
    ) -> AsyncIterator[EngineOutput]: ...

    def live_workers(self) -> int: ...


def unrebuildable_reason(request: PreprocessedRequest) -> str | None:
    """Why `request` cannot be continued on another worker once it streamed tokens, or None."""
    s = request.sampling
    if s.seed is not None and s.temperature != 0:
        return ("it sets a sampling seed, and a seeded random stream cannot be re-created at "
                "the same position on another worker")
    if s.response_format is not None and s.response_format.get("type", "text") != "text":
        return "it uses guided decoding (response_format), whose state stays on the lost worker"
    if s.presence_penalty or s.frequency_penalty:
        return ("it sets presence or frequency penalties, which count generated tokens that "
                "another worker would see as prompt")
    routing = request.routing
    if routing is not None and (routing.worker_id is not None or routing.disagg is not None):
        return "it is pinned to that worker (routing hints)"
    return None


class Progress:
    """What the client has received of one request; builds the request that continues it."""

    __slots__ = ("finished", "generated", "lost", "original", "resumed")

    def __init__(self, request: PreprocessedRequest) -> None:
        self.original = request
        self.generated: list[int] = []
        self.lost: set[int] = set()
        self.resumed = False
        self.finished = False

    def take(self, out: EngineOutput) -> EngineOutput:
        """Record one output on its way to the client."""
        self.generated.extend(out.token_ids)
        if out.finish_reason is not None:
            self.finished = True
        if self.resumed:  # the first attempt already reported the prompt's cached tokens
            out.cached_tokens = None
        return out

    def budget_left(self) -> int | None:
        limit = self.original.stop.max_tokens
        return None if limit is None else limit - len(self.generated)

    def continuation(self) -> PreprocessedRequest:
        """The original request, continued after the tokens streamed so far."""
        done = len(self.generated)
        if done == 0:
            return self.original
        self.resumed = True
        req = self.original
        stop = msgspec.structs.replace(
            req.stop,
            max_tokens=self.budget_left(),
            min_tokens=None if req.stop.min_tokens is None else max(req.stop.min_tokens - done, 0),
        )
        return msgspec.structs.replace(
            req, token_ids=[*req.token_ids, *self.generated], stop=stop,
            prior_output_tokens=req.prior_output_tokens + done,
        )


class MigratingClient:
    """An EngineClient that moves requests off lost workers, up to `limit` times each."""

    def __init__(
        self, inner: ExcludingClient, limit: int, on_migration: Callable[[], None] | None = None,
        on_stall_migration: Callable[[], None] | None = None,
    ) -> None:
        if limit < 0:
            raise ValueError(f"migration limit must be >= 0, got {limit}")
        self.inner = inner
        self.limit = limit
        self._on_migration = on_migration
        self._on_stall_migration = on_stall_migration  # also counted by on_migration

    def live_workers(self) -> int:
        return self.inner.live_workers()

    async def generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        progress = Progress(request)
        attempt = request
        migrations = 0
        while True:
            stream = self.inner.generate(attempt, context, progress.lost)
            try:
                async for out in stream:
                    yield progress.take(out)
                return
            except WorkerLost as lost:
                if context.is_stopped() or progress.finished:
                    return  # the client is gone, or has its finish: nothing to continue
                if progress.budget_left() != 0:
                    self._check(progress, lost, migrations)
                stalled = lost.stalled
            finally:
                await stream.aclose()  # type: ignore[attr-defined]  # at once, not at GC
            if progress.budget_left() == 0:  # the last token arrived, its finish did not
                yield EngineOutput(finish_reason=FINISH_LENGTH)
                return
            migrations += 1
            log.info("request %s lost its worker after %d tokens; moving it (%d of %d)",
                     request.request_id, len(progress.generated), migrations, self.limit)
            if self._on_migration is not None:
                self._on_migration()
            if stalled and self._on_stall_migration is not None:
                self._on_stall_migration()
            attempt = progress.continuation()

    def _check(self, progress: Progress, lost: WorkerLost, migrations: int) -> None:
        """Raise MigrationFailed unless the request may move; record the lost worker."""
        if lost.worker_id is not None:
            progress.lost.add(lost.worker_id)
        done = len(progress.generated)
        if migrations >= self.limit:
            raise MigrationFailed(
                f"{lost} after {done} tokens, and the request already moved {migrations} "
                f"times (migration limit {self.limit}); retry the request"
            ) from lost
        reason = unrebuildable_reason(progress.original) if done else None
        if reason is not None:
            raise MigrationFailed(
                f"{lost} after {done} tokens; the request cannot continue on another worker "
                f"because {reason}; retry the request"
            ) from lost
