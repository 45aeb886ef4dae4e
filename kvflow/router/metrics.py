"""Prometheus metrics of the router, on an injected registry, labelled by router name.

Families are created once per registry and shared, so several routers (one per model)
can report into one registry, each under its own `router` label.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvflow.router.cost import RoutingDecision

_BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_RATE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)


@dataclass(frozen=True)
class _Families:
    matched_blocks: Histogram
    hit_rate: Histogram
    chosen: Counter
    latency: Histogram
    waiting: Gauge
    rejected: Counter
    index_blocks: Gauge


_REGISTRIES: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = (
    weakref.WeakKeyDictionary()
)


def _families(registry: CollectorRegistry) -> _Families:
    found = _REGISTRIES.get(registry)
    if found is None:
        found = _REGISTRIES[registry] = _create(registry)
    return found


def _create(registry: CollectorRegistry) -> _Families:
    r = {"registry": registry}
    label = ["router"]
    return _Families(
        matched_blocks=Histogram("kvflow_router_matched_blocks",
                                 "Prompt blocks cached on the chosen worker", label,
                                 buckets=_BLOCK_BUCKETS, **r),
        hit_rate=Histogram("kvflow_router_predicted_hit_rate",
                           "Predicted fraction of prompt tokens served from cache", label,
                           buckets=_RATE_BUCKETS, **r),
        chosen=Counter("kvflow_router_decisions", "Routing decisions by chosen worker",
                       [*label, "worker_id"], **r),
        latency=Histogram("kvflow_router_decision_seconds",
                          "Time to decide one request (queue wait excluded)", label,
                          buckets=_LATENCY_BUCKETS, **r),
        waiting=Gauge("kvflow_router_waiting_requests",
                      "Requests waiting for a non-busy worker", label, **r),
        rejected=Counter("kvflow_router_rejected",
                         "Requests refused because every worker was busy", label, **r),
        index_blocks=Gauge("kvflow_router_index_blocks",
                           "Distinct KV blocks the router's index knows of", label, **r),
    )


class RouterMetrics:
    """One router's view of the shared families."""

    def __init__(self, registry: CollectorRegistry, name: str, waiting: Callable[[], int],
                 index_blocks: Callable[[], int]) -> None:
        fam = _families(registry)
        self._name = name
        self._chosen = fam.chosen
        self.matched_blocks = fam.matched_blocks.labels(router=name)
        self.hit_rate = fam.hit_rate.labels(router=name)
        self.latency = fam.latency.labels(router=name)
        self.rejected = fam.rejected.labels(router=name)
        fam.waiting.labels(router=name).set_function(waiting)
        fam.index_blocks.labels(router=name).set_function(index_blocks)

    def observe(self, decision: RoutingDecision, seconds: float) -> None:
        self.matched_blocks.observe(decision.overlap_blocks)
        self.hit_rate.observe(decision.predicted_hit_rate)
        self._chosen.labels(router=self._name, worker_id=f"{decision.worker_id:x}").inc()
        self.latency.observe(seconds)
