"""Worker-side spans of one engine request: generate → prefill → decode, under its traceparent.

`traced(generate)` wraps an engine's `generate` when tracing is on (the worker decides
once, at start; with tracing off the engine's own `generate` is served and nothing here
runs). A request without a `trace_context` is served untraced. Prefill covers arrival to
the first token (the engine's queue included); decode, the first token to the last.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.runtime import tracing
from kvflow.runtime.context import Context

Generate = Callable[[PreprocessedRequest, Context], AsyncIterator[EngineOutput]]


def traced(generate: Generate, worker_id: int) -> Generate:
    """`generate` with worker spans for requests that carry a trace context."""
    worker = f"{worker_id:x}"

    async def run(request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]:
        t = tracing.tracer()
        parent = tracing.valid_traceparent(request.trace_context)
        if t is None or parent is None:
            async for out in generate(request, context):
                yield out
            return
        async for out in _spans(t, parent, worker, generate, request, context):
            yield out

    return run


async def _spans(t: tracing.Tracer, parent: str, worker: str, generate: Generate,
                 request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]:
    root = t.start(tracing.SPAN_WORKER, parent, server=True, attributes={
        "kvflow.worker_id": worker, "kvflow.request_id": request.request_id,
        "kvflow.prompt_tokens": len(request.token_ids)})
    start = time.time_ns()
    first = 0
    tokens = 0
    finish: str | None = None
    error: str | None = None
    try:
        async for out in generate(request, context):
            tokens += len(out.token_ids)
            if not first and (out.token_ids or out.finish_reason):
                first = time.time_ns()
                prefill = t.start(tracing.SPAN_PREFILL, root, start_ns=start)
                prefill.set("kvflow.cached_tokens", out.cached_tokens or 0)
                prefill.end(first)
            if out.finish_reason is not None:
                finish = out.finish_reason
                error = out.error
            yield out
    finally:
        end = time.time_ns()
        if first:
            decode = t.start(tracing.SPAN_DECODE, root, start_ns=first)
            decode.set("kvflow.output_tokens", tokens)
            decode.end(end)
        root.set("kvflow.finish_reason", finish or "cancelled")
        root.end(end, error=error)
