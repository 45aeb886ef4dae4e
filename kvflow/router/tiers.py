"""Lower KV tiers in the router: which worker holds which block in host memory, on disk, or
in the shared object store, and how much a hit there is worth against recomputing it.

Workers publish KV events with a `medium` ("host", "disk", "object"); host and disk
blocks belong to one worker, object-store blocks to every worker of the model. After
the device prefix match, a worker's overlap is extended through the blocks it can
reach in a lower tier, each counted by its worth

    credit(tier) = max(0, 1 - load_s_per_block(tier) / recompute_s_per_block)

from the speeds the worker measured and published (`LoadMetrics.tier_block_s`), or
from the tier priors of `kvflow.kv.tiers.policy` until it has. A block worth 0 (loading
slower than recomputing) ends the extension: the engine recomputes from there too.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvflow.kv.tiers.policy import PRIOR_BANDWIDTH, PRIOR_LATENCY_S, PRIOR_RECOMPUTE_S_PER_TOKEN
from kvflow.llm.kv_events import BlocksRemoved, BlocksStored, LoadMetrics
from kvflow.router.blocks import BlockTable, OverlapScores
from kvflow.router.load import WorkerLoad

LOCAL_TIERS = ("host", "disk")
SHARED_TIER = "object"
# Prior per-block costs for a 16-token block of an 8B model (128 KiB/token), until measured.
_PRIOR_BLOCK_BYTES = 16 * 128 * 1024
PRIOR_BLOCK_S = {t: PRIOR_LATENCY_S[t] + _PRIOR_BLOCK_BYTES / bw for t, bw in PRIOR_BANDWIDTH.items()}
PRIOR_BLOCK_S["recompute"] = 16 * PRIOR_RECOMPUTE_S_PER_TOKEN


class TierResidency:
    """Per-tier block tables (host, disk per worker; object shared) and per-worker costs."""

    def __init__(self) -> None:
        self._tables = {tier: BlockTable() for tier in LOCAL_TIERS}
        self._shared: set[int] = set()
        self._costs: dict[int, dict[str, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._shared) or any(t.num_blocks() for t in self._tables.values())

    def apply(self, worker: int, data: BlocksStored | BlocksRemoved) -> None:
        tier = data.medium
        hashes: Iterable[int]
        if isinstance(data, BlocksStored):
            hashes = [b.block_hash for b in data.blocks]
            if tier == SHARED_TIER:
                self._shared.update(hashes)
            elif tier in self._tables:
                self._tables[tier].store(worker, hashes)
        elif tier == SHARED_TIER:
            self._shared.difference_update(data.block_hashes)
        elif tier in self._tables:
            self._tables[tier].remove(worker, data.block_hashes)

    def observe_costs(self, metrics: LoadMetrics) -> None:
        if metrics.tier_block_s:
            self._costs[metrics.worker_id] = dict(metrics.tier_block_s)

    def remove_worker(self, worker: int) -> None:
        for table in self._tables.values():
            table.remove_worker(worker)
        self._costs.pop(worker, None)

    def credit(self, worker: int, tier: str) -> float:
        costs = self._costs.get(worker, PRIOR_BLOCK_S)
        load = costs.get(tier, PRIOR_BLOCK_S[tier])
        recompute = costs.get("recompute", PRIOR_BLOCK_S["recompute"])
        return max(0.0, 1.0 - load / recompute) if recompute > 0 else 0.0

    def extend(self, block_hashes: Sequence[int], overlaps: OverlapScores,
               loads: Mapping[int, WorkerLoad], block_size: int) -> OverlapScores:
        """Each candidate's (the workers of `loads`) device overlap plus its credited
        lower-tier blocks that follow.

        n lower-tier blocks cost `sum(1 - credit)` blocks of prefill time to load. Loads are
        asynchronous (the request is parked while its blocks arrive, and the worker keeps
        computing), so the part of that time spent behind the prefill already queued on
        the worker (`loads[w]`, in blocks of `block_size` tokens) delays the request no
        further: the extension is `n - max(0, load - wait)`, `sum(credit)` on an idle worker.
        """
        scores: dict[int, float] = dict(overlaps.scores)
        for w, load_w in loads.items():
            credits = self._walk(w, block_hashes, overlaps.score(w))
            if credits:
                load = sum(1.0 - c for c in credits)
                hidden = load_w.prefill_tokens / block_size
                scores[w] = overlaps.score(w) + len(credits) - max(0.0, load - hidden)
        return OverlapScores(scores=scores, frequencies=overlaps.frequencies)  # type: ignore[arg-type]

    def reachable(self, worker: int, block_hashes: Sequence[int], start: int) -> int:
        """Blocks after `start` the worker would load from a lower tier (the cached tokens
        its engine will report, in blocks, beyond the device hit)."""
        return len(self._walk(worker, block_hashes, start))

    def _walk(self, worker: int, block_hashes: Sequence[int], start: int) -> list[float]:
        # Per block, the first tier (host, disk, object) holding it; a credit of 0 ends the run.
        held = [(t, self._tables[t].held_by(worker)) for t in LOCAL_TIERS]
        held.append((SHARED_TIER, self._shared))
        tiers = [(t, self.credit(worker, t), hashes) for t, hashes in held if hashes]
        out: list[float] = []
        used: dict[str, int] = {}
        for h in block_hashes[start:]:
            found = None
            for entry in tiers:
                if h in entry[2]:
                    found = entry
                    break
            if found is None or found[1] <= 0:
                break
            out.append(found[1])
            used[found[0]] = used.get(found[0], 0) + 1
        return out if self._run_pays(worker, used) else []

    def _run_pays(self, worker: int, used: dict[str, int]) -> bool:
        """With per-load latencies published ("<tier>_latency"), the whole run must still
        load faster than it recomputes (the engine decides the same way)."""
        costs = self._costs.get(worker)
        if not used or costs is None or not any(f"{t}_latency" in costs for t in used):
            return True
        load = sum(costs.get(f"{t}_latency", 0.0) + n * costs.get(t, PRIOR_BLOCK_S[t])
                   for t, n in used.items())
        return load < sum(used.values()) * costs.get("recompute", PRIOR_BLOCK_S["recompute"])


class WorkerTierMetrics:
    """The KV tier metrics workers publish (`LoadMetrics.tier_counters`), re-exposed on the
    router's registry (a frontend's /metrics) with `router` and `worker_id` labels."""

    def __init__(self) -> None:
        self._latest: dict[tuple[str, int], dict[str, float]] = {}

    def update(self, router: str, metrics: LoadMetrics) -> None:
        if metrics.tier_counters:
            self._latest[(router, metrics.worker_id)] = dict(metrics.tier_counters)

    def forget(self, router: str, worker: int) -> None:
        self._latest.pop((router, worker), None)

    def describe(self) -> list[Metric]:
        return []  # names depend on what workers send; no registration-time check

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for (router, worker), counters in list(self._latest.items()):
            for key, value in counters.items():
                name, tier, reason = [*key.split("|"), "", ""][:3]
                family = families.get(name) or families.setdefault(name, _family(name))
                family.add_metric([router, f"{worker:x}", tier, reason], value)
        yield from families.values()


def _family(name: str) -> Metric:
    labels = ["router", "worker_id", "tier", "reason"]
    doc = "KV tier metric published by a worker (kvflow.kv.tiers.metrics)"
    if name.endswith("_total"):
        return CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels)
    return GaugeMetricFamily(name, doc, labels=labels)


_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, WorkerTierMetrics] = weakref.WeakKeyDictionary()


def worker_tier_metrics(registry: CollectorRegistry) -> WorkerTierMetrics:
    """The one collector of `registry` (several routers, one per model, share it)."""
    found = _SHARED.get(registry)
    if found is None:
        found = _SHARED[registry] = WorkerTierMetrics()
        registry.register(found)  # type: ignore[arg-type]
    return found
