"""The OpenTelemetry side of `runtime.tracing`: an SDK tracer exporting OTLP/HTTP protobuf.

Imported only when tracing is on (it needs the `tracing` extra). Spans are started with
explicit parents (a span of ours, or a W3C traceparent string), never through the
ambient context, so they nest correctly across async generators and tasks.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

# Spans leave the process at least this often (milliseconds).
EXPORT_DELAY_MS = 500


def traces_url(endpoint: str) -> str:
    """An OTLP/HTTP base address (http://host:4318) → its traces URL (…/v1/traces)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def _parent_context(parent: object) -> object:
    if parent is None:
        return None
    if isinstance(parent, OtelSpan):
        return trace.set_span_in_context(parent.span)
    _version, trace_id, span_id, flags = str(parent).split("-")
    ctx = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                      trace_flags=TraceFlags(int(flags, 16)))
    return trace.set_span_in_context(NonRecordingSpan(ctx))


class OtelSpan:
    """A kvflow `Span` over an SDK span."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def set(self, key: str, value: object) -> None:
        self.span.set_attribute(key, value)  # type: ignore[arg-type]

    def traceparent(self) -> str:
        ctx = self.span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def end(self, end_ns: int | None = None, error: str | None = None) -> None:
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end(end_time=end_ns)


class OtelTracer:
    """A kvflow `Tracer`: one SDK provider per process, batching spans to OTLP/HTTP.

    `endpoint` None leaves the address to the SDK's own OTEL_EXPORTER_OTLP_* handling.
    """

    def __init__(self, service: str, endpoint: str | None) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint) if endpoint else None)
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
        self._tracer = self.provider.get_tracer("kvflow")

    def start(self, name: str, parent: object = None, *, start_ns: int | None = None,
              attributes: Mapping[str, object] | None = None, server: bool = False) -> OtelSpan:
        span = self._tracer.start_span(
            name, context=_parent_context(parent),  # type: ignore[arg-type]
            kind=SpanKind.SERVER if server else SpanKind.INTERNAL,
            attributes=attributes, start_time=start_ns)  # type: ignore[arg-type]
        return OtelSpan(span)

    def flush(self) -> None:
        self.provider.force_flush()

    def shutdown(self) -> None:
        self.provider.shutdown()
