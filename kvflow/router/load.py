"""Per-worker load as the router sees it: what it routed there, merged with what workers publish.

A routed request adds its prefill tokens (until its first token arrives) and its decode
blocks (until it finishes) to its worker. Workers' own `LoadMetrics` also count requests
from other routers; the merged view takes, per quantity, the larger of the two (both
are lower bounds of the truth: ours is fresher, theirs is fleet-wide).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from kvflow.llm.kv_events import LoadMetrics


class WorkerLoad(NamedTuple):
    """One worker's load at decision time (a NamedTuple: built per worker per decision)."""

    worker_id: int
    prefill_tokens: int = 0
    decode_blocks: int = 0
    active_requests: int = 0
    # Capacity in KV blocks, when the worker has published it.
    total_blocks: int | None = None

    @property
    def decode_fraction(self) -> float | None:
        if not self.total_blocks:
            return None
        return self.decode_blocks / self.total_blocks


@dataclass
class _RequestLoad:
    worker_id: int
    prefill_tokens: int
    decode_blocks: int
    prefill_done: bool = False


@dataclass
class _Totals:
    prefill_tokens: int = 0
    decode_blocks: int = 0
    requests: int = 0


class ActiveLoad:
    """Tracks the load of requests this router (and its replicas) routed, per worker."""

    def __init__(self) -> None:
        self._requests: dict[str, _RequestLoad] = {}
        self._totals: dict[int, _Totals] = {}
        self._metrics: dict[int, LoadMetrics] = {}
        # Merged views, rebuilt only for workers whose load changed since the last read.
        self._views: dict[int, WorkerLoad] = {}

    def add(self, request_id: str, worker_id: int, prefill_tokens: int, decode_blocks: int) -> None:
        assert request_id not in self._requests, f"request {request_id!r} routed twice"
        self._requests[request_id] = _RequestLoad(worker_id, prefill_tokens, decode_blocks)
        totals = self._totals.setdefault(worker_id, _Totals())
        self._views.pop(worker_id, None)
        totals.prefill_tokens += prefill_tokens
        totals.decode_blocks += decode_blocks
        totals.requests += 1

    def mark_prefill_done(self, request_id: str) -> bool:
        """The request's first token arrived: its prefill no longer loads the worker."""
        req = self._requests.get(request_id)
        if req is None or req.prefill_done:
            return False
        req.prefill_done = True
        self._views.pop(req.worker_id, None)
        self._totals[req.worker_id].prefill_tokens -= req.prefill_tokens
        return True

    def free(self, request_id: str) -> bool:
        """The request finished (or failed, or was cancelled): drop all its load."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        totals = self._totals[req.worker_id]
        self._views.pop(req.worker_id, None)
        if not req.prefill_done:
            totals.prefill_tokens -= req.prefill_tokens
        totals.decode_blocks -= req.decode_blocks
        totals.requests -= 1
        return True

    def update_metrics(self, metrics: LoadMetrics) -> None:
        self._metrics[metrics.worker_id] = metrics
        self._views.pop(metrics.worker_id, None)

    def published(self, worker_id: int) -> LoadMetrics | None:
        """The worker's latest published LoadMetrics, if any arrived."""
        return self._metrics.get(worker_id)

    def remove_worker(self, worker_id: int) -> None:
        """Forget a departed worker's metrics and the requests routed to it."""
        self._metrics.pop(worker_id, None)
        self._totals.pop(worker_id, None)
        self._views.pop(worker_id, None)
        gone = [rid for rid, req in self._requests.items() if req.worker_id == worker_id]
        for rid in gone:
            del self._requests[rid]

    def remove_requests(self, request_ids: Iterable[str]) -> None:
        for rid in list(request_ids):
            self.free(rid)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def worker_of(self, request_id: str) -> int | None:
        req = self._requests.get(request_id)
        return None if req is None else req.worker_id

    def load(self, worker_id: int) -> WorkerLoad:
        view = self._views.get(worker_id)
        if view is None:
            view = self._views[worker_id] = self._merge(worker_id)
        return view

    def _merge(self, worker_id: int) -> WorkerLoad:
        totals = self._totals.get(worker_id) or _Totals()
        metrics = self._metrics.get(worker_id)
        if metrics is None:
            return WorkerLoad(worker_id, totals.prefill_tokens, totals.decode_blocks,
                              totals.requests)
        return WorkerLoad(
            worker_id,
            prefill_tokens=max(totals.prefill_tokens, metrics.prefill_tokens_inflight),
            decode_blocks=max(totals.decode_blocks, metrics.active_blocks),
            active_requests=max(totals.requests, metrics.num_running + metrics.num_waiting),
            total_blocks=metrics.total_blocks or None,
        )

    def snapshot(self, worker_ids: Iterable[int]) -> dict[int, WorkerLoad]:
        return {w: self.load(w) for w in worker_ids}


def is_busy(
    load: WorkerLoad, max_decode_fraction: float | None, max_active_requests: int | None,
    max_prefill_tokens: int | None = None,
) -> bool:
    """Whether the worker is at or over a busy threshold (None disables a threshold)."""
    if max_active_requests is not None and load.active_requests >= max_active_requests:
        return True
    if max_prefill_tokens is not None and load.prefill_tokens >= max_prefill_tokens:
        return True
    fraction = load.decode_fraction
    return max_decode_fraction is not None and fraction is not None and (
        fraction >= max_decode_fraction
    )
