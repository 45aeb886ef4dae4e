"""Prometheus metrics of KV transfers, on an injected registry (a worker's or a frontend's).

`reporter` says who counted: "worker" (the decode worker that pulled) or "frontend" (what
decode workers reported back on their streams). One set per registry (`metrics_for`), so
a frontend and workers sharing one process (tests, benchmarks) share the families.
"""

from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class TransferMetrics:
    """Bytes, blocks, latency and failures of KV pulls, labelled by backend."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Counter("kvflow_kv_transfer_bytes", "KV bytes moved between workers",
                             ["backend", "reporter"], registry=registry)
        self.blocks = Counter("kvflow_kv_transfer_blocks", "KV blocks moved between workers",
                              ["backend", "reporter"], registry=registry)
        self.seconds = Histogram("kvflow_kv_transfer_seconds", "Time to pull one request's KV",
                                 ["backend", "reporter"], buckets=_LATENCY_BUCKETS,
                                 registry=registry)
        self.failures = Counter("kvflow_kv_transfer_failures", "KV pulls that failed (recomputed)",
                                ["reason"], registry=registry)
        self.tcp_between_gpus = Counter(
            "kvflow_kv_transfer_tcp_between_gpus",
            "Pulls between GPU workers that fell back to TCP", registry=registry)

    def moved(
        self, backend: str, nbytes: int, nblocks: int, seconds: float, reporter: str = "worker"
    ) -> None:
        self.bytes.labels(backend, reporter).inc(nbytes)
        self.blocks.labels(backend, reporter).inc(nblocks)
        self.seconds.labels(backend, reporter).observe(seconds)


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, TransferMetrics] = (
    weakref.WeakKeyDictionary())


def metrics_for(registry: CollectorRegistry) -> TransferMetrics:
    """The registry's transfer metrics, created on first use."""
    metrics = _BY_REGISTRY.get(registry)
    if metrics is None:
        metrics = _BY_REGISTRY[registry] = TransferMetrics(registry)
    return metrics
