"""Generation: one request in flight — engine streams in, postprocessed choice deltas out.

The loop reads aloud: take the next engine output, postprocess it for its choice,
stop that choice's engine request if a stop string ended it, yield the delta.
Usage and metrics are derived from the processors when the request ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec

from kvflow.frontend.admission import EngineOverloaded
from kvflow.frontend.engine_client import EngineUnavailable
from kvflow.frontend.errors import ApiError, engine_failed, no_workers, overloaded, worker_lost
from kvflow.frontend.http_response import Responder
from kvflow.frontend.metrics import RequestRecord
from kvflow.frontend.migration import MigrationFailed
from kvflow.frontend.models import ServedModel
from kvflow.frontend.postprocess import ChoiceDelta, ChoiceProcessor, EngineError
from kvflow.frontend.preprocess import Prepared
from kvflow.frontend.streams import ChoiceStreams
from kvflow.frontend.timeline import current_timeline
from kvflow.llm.openai import PromptTokensDetails, Usage
from kvflow.runtime.context import Context


@dataclass(frozen=True, slots=True)
class ResponseIds:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str


class ChunkPrefixes:
    """The constant bytes of one response's streamed chunks up to a choice's text field,
    built once per choice index, so a plain text chunk is prefix + one string encode + tail."""

    def __init__(self, ids: ResponseIds, object_name: bytes, text_field: bytes) -> None:
        encode = msgspec.json.encode
        self._head = (
            b'data: {"id":' + encode(ids.id) + b',"object":"' + object_name + b'","created":'
            + str(ids.created).encode() + b',"model":' + encode(ids.model) + b',"choices":[{"index":'
        )
        self._field = text_field
        self._by_index: dict[int, bytes] = {}

    def __call__(self, index: int) -> bytes:
        prefix = self._by_index.get(index)
        if prefix is None:
            prefix = self._by_index[index] = self._head + b"%d," % index + self._field
        return prefix


class Generation:
    """Drives one request's choices. Iterate `deltas()` once, then read `usage()`."""

    def __init__(
        self,
        model: ServedModel,
        prepared: Prepared,
        context: Context,
        record: RequestRecord,
        response_id: str,
    ) -> None:
        self.model = model
        self.prepared = prepared
        self.context = context
        self.record = record
        self.ids = ResponseIds(response_id, int(time.time()), model.name)
        self.processors = {
            c.index: ChoiceProcessor(model, prepared.options, c.index, c.engine_request.token_ids)
            for c in prepared.choices
        }
        self.streams = ChoiceStreams(model.engine, prepared.choices, context)
        self.timeline = current_timeline()
        if self.timeline is not None:
            self.timeline.mark_tokenized(record)

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every choice's deltas in arrival order; each choice's last one has finish_reason.

        Raises ApiError: 503 when no worker takes the request, when every worker is busy
        (with Retry-After) or when a lost request cannot move on; 500 on an engine error.
        """
        processors, streams, record = self.processors, self.streams, self.record
        single = next(iter(processors.values())) if len(processors) == 1 else None
        try:
            async for out in streams:
                proc = single or processors[out.index]
                delta = proc.process(out)
                if delta is None:
                    continue
                if not record.first_token_at:
                    record.first_token()
                ended = delta.finish_reason is not None
                if ended:
                    self._end_choice(proc)
                yield delta
                if ended and single is not None:
                    break
            for proc in processors.values():
                tail = proc.finish()
                if tail is not None:
                    yield tail
        except EngineOverloaded as exc:
            raise overloaded(self.model.name, str(exc), exc.retry_after_s) from exc
        except MigrationFailed as exc:
            raise worker_lost(str(exc)) from exc
        except EngineUnavailable as exc:
            raise no_workers(self.model.name, str(exc)) from exc
        except EngineError as exc:
            raise engine_failed(str(exc)) from exc
        finally:
            await streams.aclose()
            record.prompt_tokens = self.prepared.prompt_tokens
            record.completion_tokens = sum(p.completion_tokens for p in processors.values())
            record.cached_tokens = self.cached_tokens()

    def _end_choice(self, proc: ChoiceProcessor) -> None:
        if proc.stopped_by_string:
            self.streams.stop(proc.index)
        else:
            self.streams.finished(proc.index)

    def usage(self) -> Usage:
        completion = sum(p.completion_tokens for p in self.processors.values())
        prompt = self.prepared.prompt_tokens
        cached = self.cached_tokens()
        details = PromptTokensDetails(cached_tokens=cached)
        by_tier = self.cached_by_tier()
        if by_tier:
            details.cached_tokens_by_tier = by_tier
        return Usage(prompt, completion, prompt + completion, details)

    def cached_by_tier(self) -> dict[str, int]:
        """The engines' split of the cached tokens by KV tier, summed like `cached_tokens`."""
        n = self.prepared.n
        total: dict[str, int] = {}
        for i, p in self.processors.items():
            if i % n == 0 and p.cached_by_tier:
                for tier, count in p.cached_by_tier.items():
                    total[tier] = total.get(tier, 0) + count
        return total

    def cached_tokens(self) -> int:
        """Cached prompt tokens, counted once per prompt (from each prompt's first choice)."""
        n = self.prepared.n
        return sum(p.cached_tokens or 0 for i, p in self.processors.items() if i % n == 0)


def api_error_event(exc: ApiError) -> bytes:
    """An SSE event carrying an error (what OpenAI clients raise on mid-stream)."""
    return b"data: " + exc.body() + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def stream_sse(
    gen: Generation,
    responder: Responder,
    encode: Callable[[ChoiceDelta], bytes],
    opening: Callable[[], bytes],
    closing: Callable[[], bytes],
    done: bytes = DONE,
    error_event: Callable[[ApiError], bytes] = api_error_event,
) -> None:
    """Write `gen` as server-sent events: `opening()` before the first delta's chunk,
    `encode(delta)` per delta, then `closing()` (e.g. a usage chunk) and `done` (OpenAI's
    `[DONE]`). An error after the stream started becomes `error_event(error)`; before that
    it propagates (a plain HTTP error response)."""
    started = False
    try:
        async for delta in gen.deltas():
            data = encode(delta)
            if not started:
                started = True
                responder.start_stream()
                data = opening() + data
            if responder.write(data):
                await responder.drain()
    except ApiError as exc:
        if not started:
            raise
        gen.record.finish("error")
        responder.write(error_event(exc) + done)
        responder.end()
        return
    if not started:
        responder.start_stream()
    timing = gen.timeline.sse_event() if gen.timeline is not None else b""
    responder.write(closing() + timing + done)
    responder.end()
