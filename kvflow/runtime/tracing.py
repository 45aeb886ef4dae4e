"""Optional request tracing: a tiny facade over OpenTelemetry that imports nothing when off.

Tracing is off by default. `setup_tracing(config, service)` turns it on when the runtime
config names an OTLP endpoint (`--otlp-endpoint`) or the standard `OTEL_EXPORTER_OTLP_*`
variables do; only then is `kvflow.runtime.otel` (and OpenTelemetry, the `tracing`
extra) imported. Callers test `tracer()` once per request, never per token:

    t = tracer()
    if t is not None:
        span = t.start("kvflow.worker.generate", parent=request.trace_context)

Spans are linked across processes by W3C `traceparent` strings
(`00-<trace id>-<span id>-<flags>`), carried in `PreprocessedRequest.trace_context`.

Span names used by kvflow (one place, so a dashboard or a test can rely on them):
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Protocol

from kvflow.runtime.config import RuntimeConfig, otel_env_endpoint

if TYPE_CHECKING:
    from collections.abc import Mapping

log = logging.getLogger(__name__)

SPAN_REQUEST = "kvflow.request"  # frontend: the whole HTTP request (root, or child of traceparent)
SPAN_PARSE = "kvflow.parse"  # frontend: JSON body decode and validation
SPAN_QUEUE = "kvflow.queue"  # frontend: waiting for an admission slot (overload control)
SPAN_TOKENIZE = "kvflow.tokenize"  # frontend: chat template + tokenizer
SPAN_ROUTE = "kvflow.route"  # frontend: the router's decision (chosen worker, candidates)
SPAN_ATTEMPT = "kvflow.attempt"  # frontend: one stream from one worker (more than one = migration)
SPAN_WORKER = "kvflow.worker.generate"  # worker: the engine request, parent = its attempt
SPAN_PREFILL = "kvflow.worker.prefill"  # worker: arrival to first token (engine queue + prefill)
SPAN_DECODE = "kvflow.worker.decode"  # worker: first token to the last
# Disaggregation: a prefill → decode KV transfer is one SPAN_KV_TRANSFER span, child of the
# decode worker's SPAN_WORKER, with attributes kvflow.kv.bytes and kvflow.kv.backend.
SPAN_KV_TRANSFER = "kvflow.kv_transfer"

__doc__ += "".join(f"\n- `{name}`" for name in (
    SPAN_REQUEST, SPAN_PARSE, SPAN_QUEUE, SPAN_TOKENIZE, SPAN_ROUTE, SPAN_ATTEMPT, SPAN_WORKER,
    SPAN_PREFILL, SPAN_DECODE, SPAN_KV_TRANSFER))

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class Span(Protocol):
    """A started span: set attributes, end it (optionally at an earlier time)."""

    def set(self, key: str, value: object) -> None: ...

    def traceparent(self) -> str: ...

    def end(self, end_ns: int | None = None, error: str | None = None) -> None: ...


class Tracer(Protocol):
    """What kvflow code asks of tracing when it is on."""

    def start(self, name: str, parent: Span | str | None = None, *, start_ns: int | None = None,
              attributes: Mapping[str, object] | None = None, server: bool = False) -> Span: ...

    def flush(self) -> None: ...

    def shutdown(self) -> None: ...


_tracer: Tracer | None = None


def tracer() -> Tracer | None:
    """The process's tracer, or None when tracing is off (the common case)."""
    return _tracer


def valid_traceparent(value: str | None) -> str | None:
    """`value` when it is a well-formed W3C traceparent (version 00), else None."""
    if value and _TRACEPARENT.match(value.strip().lower()) and not value.startswith("ff"):
        return value.strip().lower()
    return None


def resolve_endpoint(config: RuntimeConfig, env: Mapping[str, str] | None = None) -> str:
    """Where spans go: the config's endpoint, else OTEL_* ("" = tracing off)."""
    return config.otlp_endpoint or otel_env_endpoint(env)


def setup_tracing(config: RuntimeConfig, service: str) -> bool:
    """Turn tracing on for this process when an endpoint is configured; True when on."""
    global _tracer
    endpoint = resolve_endpoint(config)
    if not endpoint:
        return False
    try:
        from kvflow.runtime.otel import OtelTracer
    except ImportError as exc:
        log.error("tracing: an OTLP endpoint is set but OpenTelemetry is not installed (%s); "
                  "pip install 'kvflow[tracing]', or unset it. Tracing stays off.", exc.name)
        return False
    _tracer = OtelTracer(service, config.otlp_endpoint or None)
    log.info("tracing: exporting spans of %s to %s", service, endpoint)
    return True


def shutdown_tracing() -> None:
    """Export what is buffered and turn tracing off (at process exit)."""
    global _tracer
    if _tracer is not None:
        _tracer.shutdown()
        _tracer = None


def install_tracer(t: Tracer | None) -> None:
    """Use `t` as the process's tracer (tests, embedding); None turns tracing off."""
    global _tracer
    _tracer = t
