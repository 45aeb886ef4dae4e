"""Simulated KV tiers below the mocker's GPU pool: host (G2), disk (G3), shared object store (G4).

The mocker has no KV bytes, so each tier is an LRU of block hashes with a capacity, a
bandwidth and a per-load latency; loading n blocks from a tier takes
`latency + n * bytes_per_block / bandwidth` simulated seconds, while the request is
parked. The loads of one engine share its link (`SimLink`): their latencies overlap,
their transfers run one after another, as copies into one GPU do. The policy is
the real one (`kvflow.kv.tiers.policy`): a block is loaded only when its tier's
per-block time beats recomputing it, and the disk admits a block on its second use
(`kvflow.kv.tiers.admission`). Tiers are inclusive: a block the GPU evicts goes to
each tier (disk: when admitted); G4 is one `SharedSimStore` passed to every engine
of a model in one process. Tier changes are announced in the pool's event stream
(`medium`), and measured costs in `LoadMetrics.tier_block_s`, so routers see them.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvflow.engines.core.sequence import Sequence as Seq
from kvflow.engines.mocker.config import MockerConfig
from kvflow.engines.mocker.tiers import MockerConnector
from kvflow.engines.mocker.timing import TimingParams
from kvflow.kv.connector import ExternalMatch, LoadResult
from kvflow.kv.tiers.admission import AdmissionFilter
from kvflow.llm.kv_events import BlocksRemoved, BlocksStored, LoadMetrics, StoredBlock

RecordEvent = Callable[[BlocksStored | BlocksRemoved], None]
LATENCY_S = {"host": 5e-6, "disk": 1e-4, "object": 5e-3}  # per load run


@dataclass
class SimTier:
    """An LRU of block hashes (capacity 0 = unbounded) and how fast it loads."""

    name: str
    capacity: int
    bandwidth: float
    shared: bool = False
    latency_s: float | None = None  # per load run; None: LATENCY_S[name]
    lru: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.latency_s is None:
            self.latency_s = LATENCY_S[self.name]


@dataclass
class SimLink:
    """One engine's onboarding link: transfers queue behind each other (first come, first
    served), per-load latencies (a request's round trip, a seek) do not."""

    free_at: float = 0.0

    def finish(self, now: float, latency_s: float, transfer_s: float) -> float:
        """When a load asked for at `now` completes; the link is busy until then."""
        self.free_at = max(now + latency_s, self.free_at) + transfer_s
        return self.free_at


class SharedSimStore(SimTier):
    """G4 for a set of in-process mocker engines: one object, shared by all of them."""

    def __init__(self, bandwidth: float = 12.5e9, capacity: int = 0,
                 latency_s: float = LATENCY_S["object"]) -> None:
        super().__init__("object", capacity, bandwidth, shared=True, latency_s=latency_s)


class SimTiers:
    """The lower tiers of one mocker engine and the decisions the real tiers would make."""

    def __init__(self, tiers: list[SimTier], block_size: int, bytes_per_block: float,
                 recompute_s_per_block: float, admit_after: int = 2) -> None:
        self.tiers = tiers
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self.recompute_s_per_block = recompute_s_per_block
        self.admission = AdmissionFilter(admit_after)
        self.record_event: RecordEvent | None = None
        self.loaded_blocks: dict[str, int] = {t.name: 0 for t in tiers}
        self.offloaded_blocks: dict[str, int] = {t.name: 0 for t in tiers}

    def blocks_held(self, name: str) -> int:
        return sum(len(t.lru) for t in self.tiers if t.name == name)

    def block_s(self, tier: SimTier) -> float:
        return self.bytes_per_block / tier.bandwidth

    def costs(self) -> dict[str, float]:
        out = {t.name: self.block_s(t) for t in self.tiers}  # what `match` decides on
        out |= {f"{t.name}_latency": t.latency_s or 0.0 for t in self.tiers}
        out["recompute"] = self.recompute_s_per_block
        return out

    def offload(self, seq_hashes: Sequence[int]) -> None:
        """Write back blocks the GPU evicts, all those of one allocation at once: each tier
        announces what it stored and then what it evicted in one event each (as the real
        tiers batch their residency changes), not one pair per block."""
        admits = self.admission.admits
        for tier in self.tiers:
            lru, filtered, shared = tier.lru, tier.name == "disk", tier.shared
            stored: list[StoredBlock] = []
            for seq_hash in seq_hashes:  # stored (or refreshed) newest; the oldest go after
                if (filtered and not admits(seq_hash)) or (shared and seq_hash in lru):
                    continue
                lru[seq_hash] = None
                lru.move_to_end(seq_hash)
                stored.append(StoredBlock(seq_hash, []))
            if not stored:
                continue
            evicted = [lru.popitem(last=False)[0]
                       for _ in range(len(lru) - tier.capacity if tier.capacity else 0)]
            self.offloaded_blocks[tier.name] += len(stored)
            self._announce(BlocksStored(stored, medium=tier.name))
            if evicted:
                self._announce(BlocksRemoved(evicted, medium=tier.name))

    def _announce(self, data: BlocksStored | BlocksRemoved) -> None:
        if self.record_event is not None:
            self.record_event(data)

    def match(self, hashes: Sequence[int]) -> tuple[dict[str, int], tuple[float, float]]:
        """Blocks per tier of the leading run worth loading, and the simulated (latency,
        transfer) seconds of loading them. Counted as loaded by `count_loaded`, once the
        engine takes them (a match may be asked again, e.g. on an arrival's prefetch)."""
        by_tier: dict[str, int] = {}
        tiers = [(t, self.block_s(t) < self.recompute_s_per_block) for t in self.tiers]
        for seq_hash in hashes:
            # the first tier holding it; a tier slower than recomputing ends the run
            found = None
            for entry in tiers:
                if seq_hash in entry[0].lru:
                    found = entry
                    break
            if found is None or not found[1]:
                break
            tier = found[0]
            tier.lru.move_to_end(seq_hash)
            by_tier[tier.name] = by_tier.get(tier.name, 0) + 1
        seconds = self.split_s(by_tier)
        if sum(seconds) >= sum(by_tier.values()) * self.recompute_s_per_block:
            return {}, (0.0, 0.0)  # the run's latency makes loading it slower than recomputing it
        return by_tier, seconds

    def count_loaded(self, by_tier: dict[str, int]) -> None:
        for name, n in by_tier.items():
            self.loaded_blocks[name] += n

    def split_s(self, by_tier: dict[str, int]) -> tuple[float, float]:
        """(latency, transfer) seconds of loading these blocks per tier."""
        tiers = [(self._tier(name), n) for name, n in by_tier.items()]
        return (sum(t.latency_s or 0.0 for t, _ in tiers),
                sum(n * self.block_s(t) for t, n in tiers))

    def _tier(self, name: str) -> SimTier:
        return next(t for t in self.tiers if t.name == name)


class TieredMockerConnector(MockerConnector):
    """The mocker's connector with simulated G2-G4 in front of its remote-prefill logic.

    A tier hit parks the request (`load_async`) for the simulated load time, as the real
    tiers do, so the load overlaps the other requests' steps; remote prefill (decode
    workers) keeps the modelled in-step transfer.
    """

    def __init__(self, sim: SimTiers, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sim = sim
        self.speedup_ratio = 1.0
        self.wake: Callable[[], None] = lambda: None
        self.link = SimLink()
        self._loads: dict[str, tuple[dict[str, int], tuple[float, float]]] = {}
        self._done: list[LoadResult] = []
        # As the real tiers: local lookups are cheap, the object store costs a round trip.
        self.prefetch_on_arrival = not any(tier.shared for tier in sim.tiers)

    def fill_load_metrics(self, metrics: LoadMetrics) -> None:
        """Tier costs for routers, and the simulated tiers' block counters for /metrics."""
        metrics.tier_block_s = self.sim.costs()
        counters = {f"kvflow_kv_onboard_blocks_total|{t}|": float(n)
                    for t, n in self.sim.loaded_blocks.items()}
        counters |= {f"kvflow_kv_offload_blocks_total|{t}|": float(n)
                     for t, n in self.sim.offloaded_blocks.items()}
        metrics.tier_counters = counters

    def start_load(self, seq: Seq, block_ids: Sequence[int], num_tokens: int) -> None:  # type: ignore[override]
        by_tier, (latency, transfer) = self._loads.pop(seq.request_id, ({}, (0.0, 0.0)))
        self.sim.count_loaded(by_tier)
        done = LoadResult(seq.request_id, True)
        loop = asyncio.get_running_loop()
        if self.speedup_ratio <= 0:
            loop.call_soon(self._finish, done)
        else:
            speedup = self.speedup_ratio
            loop.call_at(self.link.finish(loop.time(), latency / speedup, transfer / speedup),
                         self._finish, done)

    def _finish(self, result: LoadResult) -> None:
        self._done.append(result)
        self.wake()

    def take_finished_loads(self) -> list[LoadResult]:
        done, self._done = self._done, []
        return done

    def has_pending(self) -> bool:
        return bool(self._done)

    def before_evict(self, block_ids: Sequence[int], seq_hashes: Sequence[int]) -> None:
        self.sim.offload(seq_hashes)

    def request_finished(self, seq: Seq) -> bool:  # type: ignore[override]
        n = min(len(seq.block_ids), seq.num_computed_tokens // self.block_size)
        self.sim.admission.note(seq.block_hashes(n, self.block_size))
        return super().request_finished(seq)

    def match_external(self, seq: Seq, num_local_tokens: int) -> ExternalMatch:  # type: ignore[override]
        bs = self.block_size
        first, last = num_local_tokens // bs, (seq.num_tokens - 1) // bs
        by_tier: dict[str, int] = {}
        seconds = (0.0, 0.0)
        if first < last and num_local_tokens % bs == 0:
            by_tier, seconds = self.sim.match(seq.block_hashes(last, bs)[first:])
        load_s = sum(seconds)
        tier_tokens = sum(by_tier.values()) * bs
        if seq.num_cached_tokens < 0:
            split = {"device": num_local_tokens} if num_local_tokens else {}
            seq.cached_by_tier = split | {t: n * bs for t, n in by_tier.items()}
        rest = super().match_external(seq, num_local_tokens + tier_tokens)
        if tier_tokens and not rest.num_tokens:
            self._loads[seq.request_id] = (by_tier, seconds)  # counted when it starts
            return ExternalMatch(num_tokens=tier_tokens, num_cached_tokens=tier_tokens,
                                 transfer_s=load_s, load_async=True)
        self.sim.count_loaded(by_tier)  # a modelled copy within the step: counted now
        return ExternalMatch(num_tokens=tier_tokens + rest.num_tokens,
                             num_cached_tokens=tier_tokens + rest.num_cached_tokens,
                             transfer_s=load_s + rest.transfer_s)


def make_sim_tiers(config: MockerConfig, params: TimingParams,
                   object_store: SharedSimStore | None = None) -> SimTiers | None:
    """The simulated tiers `config` asks for (None when it asks for none)."""
    if not (config.num_host_blocks or config.num_disk_blocks or config.object_store
            or object_store is not None):
        return None
    tiers: list[SimTier] = []
    if config.num_host_blocks:
        tiers.append(SimTier("host", config.num_host_blocks, config.host_bandwidth))
    if config.num_disk_blocks:
        tiers.append(SimTier("disk", config.num_disk_blocks, config.disk_bandwidth))
    if object_store is not None or config.object_store:
        tiers.append(object_store or SharedSimStore(config.object_bandwidth))
    bs = config.block_size
    recompute = bs * params.flops_per_token / params.matmul_flops  # compute-bound prefill
    return SimTiers(tiers, bs, bs * params.kv_bytes_per_token, recompute)
