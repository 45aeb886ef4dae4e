"""Prometheus metrics of KV transfers, on an injected registry (a worker's or a frontend's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class TransferMetrics:
    """Bytes, blocks, latency and failures of KV pulls, labelled by backend."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Counter("kvflow_kv_transfer_bytes", "KV bytes moved between workers",
                             ["backend"], registry=registry)
        self.blocks = Counter("kvflow_kv_transfer_blocks", "KV blocks moved between workers",
                              ["backend"], registry=registry)
        self.seconds = Histogram("kvflow_kv_transfer_seconds", "Time to pull one request's KV",
                                 ["backend"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.failures = Counter("kvflow_kv_transfer_failures", "KV pulls that failed (recomputed)",
                                ["reason"], registry=registry)
        self.tcp_between_gpus = Counter(
            "kvflow_kv_transfer_tcp_between_gpus",
            "Pulls between GPU workers that fell back to TCP", registry=registry)

    def moved(self, backend: str, nbytes: int, nblocks: int, seconds: float) -> None:
        self.bytes.labels(backend).inc(nbytes)
        self.blocks.labels(backend).inc(nblocks)
        self.seconds.labels(backend).observe(seconds)
