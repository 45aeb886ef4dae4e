"""Per-endpoint Prometheus metrics kept by the serving side of the request plane."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class EndpointMetrics:
    """Requests, errors, in-flight, duration and bytes per endpoint path.

    Per-response work is a plain integer add in the stream; counters are updated
    once per request, so the hot path stays cheap.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        label = ["endpoint"]
        self.requests = Counter("kvflow_endpoint_requests", "Requests received", label, registry=registry)
        self.errors = Counter("kvflow_endpoint_errors", "Requests that failed", label, registry=registry)
        self.inflight = Gauge(
            "kvflow_endpoint_inflight_requests", "Streams in flight", label, registry=registry
        )
        self.duration = Histogram(
            "kvflow_endpoint_request_duration_seconds",
            "Stream duration",
            label,
            registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
        )
        self.bytes_in = Counter("kvflow_endpoint_request_bytes", "Request bytes", label, registry=registry)
        self.bytes_out = Counter("kvflow_endpoint_response_bytes", "Response bytes", label, registry=registry)
        self.responses = Counter("kvflow_endpoint_responses", "Streamed responses", label, registry=registry)

    def started(self, path: str, nbytes: int) -> None:
        self.requests.labels(path).inc()
        self.bytes_in.labels(path).inc(nbytes)
        self.inflight.labels(path).inc()

    def finished(self, path: str, seconds: float, responses: int, nbytes: int, failed: bool) -> None:
        self.inflight.labels(path).dec()
        self.duration.labels(path).observe(seconds)
        self.responses.labels(path).inc(responses)
        self.bytes_out.labels(path).inc(nbytes)
        if failed:
            self.errors.labels(path).inc()
