"""Prometheus metrics of the HTTP frontend, in a registry of its own (one per server).

Per-token work is nil: a request records its first-token time once, and everything
else (duration, mean inter-token latency, token counts) is observed when it ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()

_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = tuple(float(2**i) for i in range(0, 18))


class FrontendMetrics:
    """The frontend's metric families. `request(model, endpoint)` starts one request's record."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models: set[str] = set()
        ns = "kvflow_frontend"
        r = self.registry
        self.requests = Counter(
            f"{ns}_requests", "Requests served", ["model", "endpoint", "status"], registry=r
        )
        self.inflight = Gauge(
            f"{ns}_inflight_requests", "Requests in flight", ["model"], registry=r
        )
        self.ttft = Histogram(
            f"{ns}_time_to_first_token_seconds", "Time to first token", ["model"],
            buckets=_TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            f"{ns}_inter_token_latency_seconds", "Mean inter-token latency of each request",
            ["model"], buckets=_ITL_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            f"{ns}_request_duration_seconds", "Request duration", ["model"],
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.isl = Histogram(
            f"{ns}_input_sequence_tokens", "Prompt length in tokens", ["model"],
            buckets=TOKEN_BUCKETS, registry=r,
        )
        self.uncached = Histogram(
            f"{ns}_uncached_input_tokens", "Prompt tokens per request not served from the KV "
            "prefix cache (what its prefill computes)", ["model"], buckets=TOKEN_BUCKETS, registry=r,
        )
        self.osl = Histogram(
            f"{ns}_output_sequence_tokens", "Generated tokens per request", ["model"],
            buckets=TOKEN_BUCKETS, registry=r,
        )
        self.cached = Counter(
            f"{ns}_cached_tokens", "Prompt tokens served from the KV prefix cache", ["model"],
            registry=r,
        )
        self.migrations = Counter(
            f"{ns}_migrations", "Requests sent again to another worker after theirs was lost",
            ["model"], registry=r,
        )
        self.rejected = Counter(
            f"{ns}_rejected_requests", "Requests refused by overload control (429)",
            ["model", "reason"], registry=r,
        )

        self.stalls = Counter(
            f"{ns}_stalls", "Streams given up because their worker stalled (silent: sent "
            "nothing too long; gone: lease expired)", ["model", "reason"], registry=r,
        )
        self.stall_migrations = Counter(
            f"{ns}_stall_migrations", "Migrations caused by a stalled worker", ["model"],
            registry=r,
        )
        self.canary_failures = Counter(
            f"{ns}_canary_failures", "Workers taken out of rotation for missing a canary ping",
            ["model"], registry=r,
        )
        self.connections_closed = Counter(
            f"{ns}_closed_connections", "HTTP connections closed by a timeout (header, body, "
            "idle) or refused over the connection limit (limit)", ["reason"], registry=r,
        )
        self.connections_open = Gauge(
            f"{ns}_open_connections", "HTTP connections open now", registry=r,
        )

    def count_stall(self, model: str, reason: str) -> None:
        self.stalls.labels(model=model, reason=reason).inc()

    def count_stall_migration(self, model: str) -> None:
        self.stall_migrations.labels(model=model).inc()

    def count_canary_failure(self, model: str) -> None:
        self.canary_failures.labels(model=model).inc()

    def count_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason=reason).inc()

    def _start_series(self, model: str) -> None:
        """Show a model's event counters at 0 from its first request (so rates are defined)."""
        self._models.add(model)
        self.migrations.labels(model=model)
        for reason in ("queue_full", "queue_timeout"):
            self.rejected.labels(model=model, reason=reason)

    def count_migration(self, model: str) -> None:
        self.migrations.labels(model=model).inc()

    def count_rejected(self, model: str, reason: str) -> None:
        self.rejected.labels(model=model, reason=reason).inc()

    def request(self, model: str, endpoint: str) -> RequestRecord:
        if model not in self._models:
            self._start_series(model)
        self.inflight.labels(model=model).inc()
        return RequestRecord(self, model, endpoint)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(slots=True)
class RequestRecord:
    """One request's timings; `first_token()` on the first token, `finish()` exactly once."""

    metrics: FrontendMetrics
    model: str
    endpoint: str
    start: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    done: bool = False
    # Set by the request's Generation as it ends.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def first_token(self) -> None:
        if not self.first_token_at:
            self.first_token_at = time.perf_counter()
            self.metrics.ttft.labels(model=self.model).observe(self.first_token_at - self.start)

    def finish(self, status: str) -> None:
        if self.done:
            return
        self.done = True
        m, model = self.metrics, self.model
        end = time.perf_counter()
        m.inflight.labels(model=model).dec()
        m.requests.labels(model=model, endpoint=self.endpoint, status=status).inc()
        m.duration.labels(model=model).observe(end - self.start)
        if status != "success":
            return
        m.isl.labels(model=model).observe(self.prompt_tokens)
        m.uncached.labels(model=model).observe(max(self.prompt_tokens - self.cached_tokens, 0))
        m.osl.labels(model=model).observe(self.completion_tokens)
        if self.cached_tokens:
            m.cached.labels(model=model).inc(self.cached_tokens)
        if self.completion_tokens > 1 and self.first_token_at:
            itl = (end - self.first_token_at) / (self.completion_tokens - 1)
            m.itl.labels(model=model).observe(itl)
