"""Prometheus metrics of the KV tiers, per tier and direction, on an injected registry.

Names: `kvflow_kv_offload_{blocks,bytes}_total{tier}` (device → tier),
`kvflow_kv_onboard_{blocks,bytes}_total{tier}` (tier → device), lookups and hits per
tier (`kvflow_kv_tier_hit_rate{tier}` is hits / lookups), onboard latency
(`kvflow_kv_onboard_seconds{tier}`), disk bytes written per served token, tier
errors and rejected (corrupt, foreign) blocks by reason.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class TierMetrics:
    """Counters the tier manager updates; one instance per worker process registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        self.registry = reg

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("tier",)) -> Counter:
            return Counter(f"kvflow_kv_{name}", doc, list(labels), registry=reg)

        self.offload_blocks = counter("offload_blocks", "KV blocks written from the device to a tier")
        self.offload_bytes = counter("offload_bytes", "bytes of KV written from the device to a tier")
        self.onboard_blocks = counter("onboard_blocks", "KV blocks loaded from a tier to the device")
        self.onboard_bytes = counter("onboard_bytes", "bytes of KV loaded from a tier to the device")
        self.lookups = counter("tier_lookups", "blocks looked up in a tier")
        self.hits = counter("tier_hits", "blocks looked up in a tier and found there")
        self.skipped = counter("onboard_skipped", "tier hits recomputed: loading predicted slower")
        self.errors = counter("tier_errors", "tier operations that failed (tier skipped a while)",
                              ("tier", "reason"))
        self.rejected = counter("tier_rejected_blocks", "stored blocks refused (corrupt, foreign)",
                                ("tier", "reason"))
        self.dropped = counter("offload_dropped", "offloads dropped: the writer queue was full")
        self.served_tokens = Counter("kvflow_kv_served_tokens", "tokens served by engines with tiers",
                                     registry=reg)
        self.hit_rate = Gauge("kvflow_kv_tier_hit_rate", "blocks found / blocks looked up, per tier",
                              ["tier"], registry=reg)
        self.disk_bytes_per_token = Gauge(
            "kvflow_kv_disk_bytes_per_served_token", "bytes written to the disk tier per served token",
            registry=reg)
        self.onboard_seconds = Histogram(
            "kvflow_kv_onboard_seconds", "time to load one run of blocks from a tier",
            ["tier"], buckets=_LATENCY_BUCKETS, registry=reg)
        self._lookups: dict[str, int] = {}
        self._hits: dict[str, int] = {}
        self._disk_bytes = 0
        self._served = 0

    def lookup(self, tier: str, hit: bool) -> None:
        self.lookup_many(tier, 1, int(hit))

    def lookup_many(self, tier: str, looked: int, found: int) -> None:
        if not looked:
            return
        self.lookups.labels(tier).inc(looked)
        self._lookups[tier] = self._lookups.get(tier, 0) + looked
        if found:
            self.hits.labels(tier).inc(found)
            self._hits[tier] = self._hits.get(tier, 0) + found
        self.hit_rate.labels(tier).set(self._hits.get(tier, 0) / self._lookups[tier])

    def offloaded(self, tier: str, num_bytes: int) -> None:
        self.offloaded_many(tier, 1, num_bytes)

    def offloaded_many(self, tier: str, num_blocks: int, num_bytes: int) -> None:
        self.offload_blocks.labels(tier).inc(num_blocks)
        self.offload_bytes.labels(tier).inc(num_bytes)
        if tier == "disk":
            self._disk_bytes += num_bytes
            self._update_disk_ratio()

    def onboarded(self, tier: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        self.onboard_blocks.labels(tier).inc(num_blocks)
        self.onboard_bytes.labels(tier).inc(num_bytes)
        self.onboard_seconds.labels(tier).observe(seconds)

    def served(self, num_tokens: int) -> None:
        self.served_tokens.inc(num_tokens)
        self._served += num_tokens
        self._update_disk_ratio()

    def _update_disk_ratio(self) -> None:
        if self._served:
            self.disk_bytes_per_token.set(self._disk_bytes / self._served)


def metrics_snapshot(registry: CollectorRegistry) -> dict[str, float]:
    """Every `kvflow_kv_*` sample as "name|tier|reason" -> value (histogram buckets left out)."""
    out: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if not sample.name.startswith("kvflow_kv_") or sample.name.endswith(("_bucket", "_created")):
                continue
            labels = sample.labels
            out[f"{sample.name}|{labels.get('tier', '')}|{labels.get('reason', '')}"] = sample.value
    return out
