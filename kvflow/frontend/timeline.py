"""Where one request's time goes: phase marks, routing decisions, and their three outputs.

A `Timeline` is started per OpenAI request by `observed(handler)` and found by the stages
through `current_timeline()` (a context variable: each request's tasks see their own).
Stages mark phase ends (a `perf_counter()` store, no per-token work):

    start ─parse─▶ queued ─queue─▶ admitted ─tokenize─▶ tokenized ─route─▶ … first token … end

When the request ends the split goes to (1) a DEBUG log line, (2) the `kvflow_timing`
response field when the client sent `X-Kvflow-Timing: 1`, and (3) OpenTelemetry spans when
tracing is on: `kvflow.request` (child of the client's `traceparent`) with parse, queue,
tokenize and route children, and one live `kvflow.attempt` span per worker stream whose
traceparent travels to the worker in `PreprocessedRequest.trace_context`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from kvflow.frontend.errors import ApiError
from kvflow.runtime import tracing

if TYPE_CHECKING:
    from kvflow.frontend.handlers import FrontendState, Handler
    from kvflow.frontend.http_response import HttpRequest, Responder
    from kvflow.frontend.metrics import RequestRecord
    from kvflow.llm.protocol import PreprocessedRequest
    from kvflow.router.cost import RoutingDecision

log = logging.getLogger("kvflow.frontend.timing")
TIMING_HEADER = "x-kvflow-timing"
TIMING_FIELD = b"kvflow_timing"
TOP_CANDIDATES = 3
_current: ContextVar[Timeline | None] = ContextVar("kvflow_timeline", default=None)


def current_timeline() -> Timeline | None:
    """The timeline of the request this task serves, if any."""
    return _current.get()


@dataclass(frozen=True)
class TimingSplit:
    """Milliseconds per phase of one request (0 for phases it did not reach)."""

    parse_ms: float
    queue_ms: float
    tokenize_ms: float
    route_ms: float
    ttft_ms: float
    decode_ms: float
    total_ms: float
    worker: str
    attempts: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class RouteMark:
    """One routing decision of the request (more than one when it migrated)."""

    started: float
    ended: float
    decision: RoutingDecision


class Timeline:
    """One request's phase times; see the module docstring."""

    __slots__ = ("_root", "_wall0", "admitted", "attempts", "endpoint", "queued", "record",
                 "routes", "start", "tokenized", "want_field")

    def __init__(self, endpoint: str, traceparent: str | None = None,
                 want_field: bool = False) -> None:
        self.start = time.perf_counter()
        self._wall0 = time.time_ns()
        self.endpoint = endpoint
        self.want_field = want_field
        self.queued = self.admitted = self.tokenized = 0.0
        self.routes: list[RouteMark] = []
        self.attempts = 0
        self.record: RequestRecord | None = None
        t = tracing.tracer()
        self._root = None if t is None else t.start(
            tracing.SPAN_REQUEST, tracing.valid_traceparent(traceparent), server=True,
            start_ns=self._wall0, attributes={"kvflow.endpoint": endpoint})

    # --- marks (called by the stages) ------------------------------------------------
    def mark_queued(self) -> None:
        self.queued = time.perf_counter()

    def mark_admitted(self) -> None:
        self.admitted = time.perf_counter()

    def mark_tokenized(self, record: RequestRecord) -> None:
        self.tokenized = time.perf_counter()
        self.record = record

    def routed(self, started: float, decision: RoutingDecision) -> None:
        self.routes.append(RouteMark(started, time.perf_counter(), decision))

    def attempt(self, request: PreprocessedRequest, worker: int) -> tracing.Span | None:
        """A worker stream begins: its span (tracing on) is the worker's parent."""
        self.attempts += 1
        if self._root is None:
            return None
        t = tracing.tracer()
        if t is None:
            return None
        span = t.start(tracing.SPAN_ATTEMPT, self._root, attributes={
            "kvflow.worker_id": f"{worker:x}", "kvflow.attempt": self.attempts,
            "kvflow.request_id": request.request_id})
        request.trace_context = span.traceparent()
        return span

    # --- outputs -----------------------------------------------------------------
    def split(self, now: float | None = None) -> TimingSplit:
        end = time.perf_counter() if now is None else now
        record = self.record
        first = record.first_token_at if record is not None else 0.0
        route = sum(r.ended - r.started for r in self.routes)
        worker = f"{self.routes[-1].decision.worker_id:x}" if self.routes else ""

        def ms(a: float, b: float) -> float:
            return round((b - a) * 1000, 3) if a and b and b >= a else 0.0

        return TimingSplit(
            parse_ms=ms(self.start, self.queued), queue_ms=ms(self.queued, self.admitted),
            tokenize_ms=ms(self.admitted, self.tokenized), route_ms=round(route * 1000, 3),
            ttft_ms=ms(self.start, first), decode_ms=ms(first, end), total_ms=ms(self.start, end),
            worker=worker, attempts=self.attempts,
            prompt_tokens=record.prompt_tokens if record else 0,
            completion_tokens=record.completion_tokens if record else 0)

    def field_bytes(self) -> bytes:
        """`"kvflow_timing":{...}` for a JSON body, or b"" when the client did not ask."""
        if not self.want_field:
            return b""
        return b'"' + TIMING_FIELD + b'":' + msgspec.json.encode(asdict(self.split()))

    def extend_json(self, body: bytes) -> bytes:
        """A JSON object body with the timing field added (unchanged when not asked for)."""
        extra = self.field_bytes()
        if not extra or not body.endswith(b"}"):
            return body
        return body[:-1] + b"," + extra + b"}"

    def sse_event(self) -> bytes:
        """A final SSE event carrying the timing field (b"" when not asked for)."""
        extra = self.field_bytes()
        return b"data: {" + extra + b"}\n\n" if extra else b""

    def finish(self, status: str) -> None:
        """The request ended: log the split at DEBUG and end the spans."""
        end = time.perf_counter()
        if log.isEnabledFor(logging.DEBUG):
            s = self.split(end)
            log.debug("%s %s: parse=%.2fms queue=%.2fms tokenize=%.2fms route=%.2fms "
                      "worker=%s attempts=%d ttft=%.2fms decode=%.2fms total=%.2fms tokens=%d/%d",
                      self.endpoint, status, s.parse_ms, s.queue_ms, s.tokenize_ms, s.route_ms,
                      s.worker or "-", s.attempts, s.ttft_ms, s.decode_ms, s.total_ms,
                      s.prompt_tokens, s.completion_tokens)
        if self._root is not None:
            self._export(status, end)

    def _ns(self, t: float) -> int:
        return self._wall0 + int((t - self.start) * 1e9)

    def _export(self, status: str, end: float) -> None:
        t = tracing.tracer()
        root = self._root
        assert root is not None
        if t is not None:
            for name, a, b in ((tracing.SPAN_PARSE, self.start, self.queued),
                               (tracing.SPAN_QUEUE, self.queued, self.admitted),
                               (tracing.SPAN_TOKENIZE, self.admitted, self.tokenized)):
                if a and b:
                    t.start(name, root, start_ns=self._ns(a)).end(self._ns(b))
            for mark in self.routes:
                span = t.start(tracing.SPAN_ROUTE, root, start_ns=self._ns(mark.started),
                               attributes=route_attributes(mark.decision))
                span.end(self._ns(mark.ended))
        s = self.split(end)
        for key in ("ttft_ms", "total_ms", "prompt_tokens", "completion_tokens", "attempts"):
            root.set(f"kvflow.{key}", getattr(s, key))
        root.set("kvflow.status", status)
        root.end(self._ns(end), error=None if status == "success" else status)


def route_attributes(decision: RoutingDecision) -> dict[str, Any]:
    """Span attributes of a routing decision: the choice, and the cheapest candidates."""
    ranked = sorted(decision.loads, key=lambda w: decision.costs.get(w, 0.0))[:TOP_CANDIDATES]
    candidates = []
    for w in ranked:
        load = decision.loads[w]
        candidates.append(f"{w:x} overlap={decision.overlaps.get(w, 0)} "
                          f"cost={decision.costs.get(w, 0.0):.2f} prefill={load.prefill_tokens} "
                          f"decode_blocks={load.decode_blocks} active={load.active_requests}")
    return {"kvflow.worker_id": f"{decision.worker_id:x}", "kvflow.policy": decision.policy,
            "kvflow.overlap_blocks": decision.overlap_blocks,
            "kvflow.predicted_hit_rate": decision.predicted_hit_rate,
            "kvflow.candidates": candidates}


def _status(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return f"http_{exc.status}"
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"


def observed(handler: Handler, endpoint: str) -> Handler:
    """`handler` with a Timeline around each request (see the module docstring)."""

    async def run(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
        headers = request.headers
        timeline = Timeline(endpoint, headers.get("traceparent"),
                            headers.get(TIMING_HEADER, "") in ("1", "true", "yes"))
        token = _current.set(timeline)
        status = "success"
        try:
            await handler(state, request, responder)
        except BaseException as exc:
            status = _status(exc)
            raise
        finally:
            _current.reset(token)
            timeline.finish(status)

    return run
