"""TierConnector: the tiered KV cache behind an engine core's KV connector hooks.

- `before_evict` (write-back): the evicted blocks' KV is copied out of the device cache
  in one batch (`BlockMover`: a gather and one copy per run, on a side CUDA stream on
  GPUs) into host slab slots, then written to disk / object store from the writer thread.
- `request_finished`: the request's blocks count as used once more (disk admission);
  with write-through, its computed blocks are offloaded now.
- `match_external`: after the device prefix hit, the leading run of the prompt's next
  blocks held in a lower tier and predicted faster to load than to recompute; the
  request is parked (`load_async`) while `start_load` fetches them and copies them in on
  a background thread, so the I/O overlaps the other requests' steps. Host blocks are
  copied straight from their pinned slab slots, disk/object blocks from a staging
  tensor, each with one batched `BlockMover.to_device` (no per-block copy loop).
- `take_finished_loads` also hands tier residency changes to the pool's event stream
  (`medium` = "host" / "disk" / "object"), so routers see every tier.

The engine reports its prefill speed through `observe_step`, which the load-vs-recompute
prediction uses. Each request's cached prompt tokens by tier land in `seq.cached_by_tier`
(device included) at its first admission.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash
from prometheus_client import CollectorRegistry

from kvflow.kv.blocks import KvBlockIO
from kvflow.kv.connector import (
    NO_EXTERNAL,
    BaseConnector,
    ConnectorFactory,
    ConnectorSeq,
    EngineKv,
    ExternalMatch,
    LoadResult,
)
from kvflow.kv.layout import KvLayout
from kvflow.kv.tiers.config import TierConfig
from kvflow.kv.tiers.manager import LoadedRun, TieredKvCache
from kvflow.kv.tiers.metrics import metrics_snapshot
from kvflow.kv.tiers.mover import BlockMover, host_tensor
from kvflow.kv.tiers.record import KvIdentity
from kvflow.llm.kv_events import BlocksRemoved, BlocksStored, LoadMetrics, StoredBlock

RecordEvent = Callable[[BlocksStored | BlocksRemoved], None]


@dataclass(frozen=True)
class _Plan:
    hashes: list[int]
    tiers: list[str]
    first_admission: bool  # count its tokens in the usage split (not on a re-admission)


class TierConnector(BaseConnector):
    """Connects one engine's device cache (through its KvBlockIO) to its TieredKvCache."""

    def __init__(self, tiers: TieredKvCache, io: KvBlockIO, block_size: int,
                 wake: Callable[[], None], record_event: RecordEvent | None = None) -> None:
        self.tiers = tiers
        self.io = io
        self.mover = BlockMover(io)
        self.block_size = block_size
        self._wake = wake
        self._record_event = record_event
        self._write_through = tiers.config.kv_offload == "write-through"
        self._plans: dict[str, _Plan] = {}
        self._lock = threading.Lock()
        self._finished: list[LoadResult] = []
        tiers.on_residency = self._residency_changed
        # Host and disk lookups are in-memory; an object store is asked over the network.
        self.prefetch_on_arrival = not any(store.shared for store in tiers.stores)

    # ---- offload --------------------------------------------------------------------

    def before_evict(self, block_ids: Sequence[int], seq_hashes: Sequence[int]) -> None:
        if not self._write_through:
            self.offload(block_ids, seq_hashes)

    def request_finished(self, seq: ConnectorSeq) -> bool:
        n = min(len(seq.block_ids), seq.num_computed_tokens // self.block_size)
        hashes = seq.block_hashes(n, self.block_size)
        self.tiers.note_use(hashes)
        self.tiers.metrics.served(seq.num_tokens)
        if self._write_through:
            keep = [i for i, h in enumerate(hashes) if not self.tiers.holds_below(h)]
            self.offload([seq.block_ids[i] for i in keep], [hashes[i] for i in keep])
        return False

    def offload(self, block_ids: Sequence[int], hashes: Sequence[int]) -> None:
        """Copy device blocks below: into host slab slots with one batched copy (then the
        writer thread takes them further down), or, with no host tier, through a staging
        tensor as records for disk / object store."""
        if not block_ids:
            return
        host = self.tiers.host
        if host is None:
            staging = host_tensor(len(block_ids), self.mover.block_bytes, pin=False)
            self.mover.to_host(block_ids, staging, range(len(block_ids)))
            for i, seq_hash in enumerate(hashes):
                self.tiers.offload(seq_hash, memoryview(staging[i].numpy()))
            return
        new = [i for i, h in enumerate(hashes) if not host.contains(h)]
        slots = host.reserve(len(new))
        new = new[: len(slots)]  # the rest: the slab is full of blocks being loaded
        if not new:
            return
        self.mover.to_host([block_ids[i] for i in new], host.slab, slots)
        self.tiers.stored_on_host([hashes[i] for i in new], slots)

    def observe_step(self, num_prefill_tokens: int, seconds: float) -> None:
        self.tiers.costs.observe_prefill(num_prefill_tokens, seconds)

    def fill_load_metrics(self, metrics: LoadMetrics) -> None:
        metrics.tier_block_s = self.tiers.costs.snapshot()
        metrics.tier_counters = metrics_snapshot(self.tiers.metrics.registry)

    def close(self) -> None:
        """Write what is queued (a graceful stop keeps write-back/through blocks), then stop."""
        self.tiers.close()

    # ---- onboard --------------------------------------------------------------------

    def match_external(self, seq: ConnectorSeq, num_local_tokens: int) -> ExternalMatch:
        bs = self.block_size
        first, last = num_local_tokens // bs, (seq.num_tokens - 1) // bs
        first_admission = seq.num_cached_tokens < 0
        if first_admission:  # the split usage reports
            seq.cached_by_tier = {"device": num_local_tokens} if num_local_tokens else {}
        if first >= last or num_local_tokens % bs:
            return NO_EXTERNAL
        hashes = seq.block_hashes(last, bs)[first:]
        tiers = self.tiers.probe(hashes)
        if not tiers:
            return NO_EXTERNAL
        self._plans[seq.request_id] = _Plan(hashes[: len(tiers)], tiers, first_admission)
        n = len(tiers) * bs
        predicted = sum(self.tiers.costs.load_s(t, 1) for t in tiers)
        return ExternalMatch(num_tokens=n, num_cached_tokens=n, transfer_s=predicted, load_async=True)

    def start_load(self, seq: ConnectorSeq, block_ids: Sequence[int], num_tokens: int) -> None:
        plan = self._plans.pop(seq.request_id)
        n = num_tokens // self.block_size
        assert len(block_ids) == n == len(plan.hashes), "a tier load covers whole blocks"
        blocks = list(block_ids)
        self.tiers.prefetch(plan.hashes).add_done_callback(
            lambda done: self._landed(seq, blocks, done, plan.first_admission))

    def _landed(self, seq: ConnectorSeq, block_ids: list[int], done: Future[LoadedRun],
                count: bool) -> None:
        ok, reason = False, "missing"
        run: LoadedRun | None = None
        try:
            run = done.result()
            if len(run) == len(block_ids):
                self._copy_in(run, block_ids)
                if count:
                    self._count_loaded(seq, run)
                ok, reason = True, ""
        except Exception as exc:  # a failed load recomputes; never a worker crash
            reason = repr(exc)
        finally:
            if run is not None:
                run.release()
        with self._lock:
            self._finished.append(LoadResult(seq.request_id, ok, reason))
        self._wake()

    def _copy_in(self, run: LoadedRun, block_ids: list[int]) -> None:
        """Copy a loaded run into its device blocks: host blocks straight from their slab
        slots, the others from one staging tensor; one batched copy each."""
        started = time.perf_counter()
        slots = np.asarray(run.slots, dtype=np.int64)
        ids = np.asarray(block_ids, dtype=np.int64)
        from_host = slots >= 0
        if from_host.any():
            assert self.tiers.host is not None
            self.mover.to_device(ids[from_host], self.tiers.host.slab, slots[from_host])
        self.tiers.landed(run, time.perf_counter() - started)
        lower = np.flatnonzero(~from_host)
        if len(lower):
            self._copy_in_lower(run, lower, ids[lower])

    def _copy_in_lower(self, run: LoadedRun, lower: np.ndarray, block_ids: np.ndarray) -> None:
        """Disk/object blocks: their checked bytes go into host slab slots (a G3/G4 hit
        also fills G2, and the slab is pinned), or into a staging tensor when there is no
        host tier or no free slot; the per-block byte copies run on the fetch threads."""
        host = self.tiers.host
        slots = host.reserve(len(lower)) if host is not None else []
        if host is not None and len(slots) == len(lower):
            dst, rows = host.slab, slots
        else:
            if host is not None:
                host.unreserve(slots)
            host, dst, rows = None, host_tensor(len(lower), self.mover.block_bytes, pin=False), \
                list(range(len(lower)))
        arr = dst.numpy()

        def put(k: int) -> None:
            arr[rows[k]] = np.frombuffer(run.payload(int(lower[k])), dtype=np.uint8)

        for _ in self.tiers.map_io(put, range(len(lower))):
            pass
        self.mover.to_device(block_ids, dst, rows)
        if host is not None:
            self.tiers.promoted_to_host([run.hashes[int(i)] for i in lower], slots)

    def _count_loaded(self, seq: ConnectorSeq, run: LoadedRun) -> None:
        if seq.cached_by_tier is None:
            seq.cached_by_tier = {}
        for tier, blocks in run.by_tier().items():
            seq.cached_by_tier[tier] = seq.cached_by_tier.get(tier, 0) + blocks * self.block_size

    # ---- polled by the scheduler (under the engine's lock) ----------------------------

    def take_finished_loads(self) -> list[LoadResult]:
        self._flush_residency()
        with self._lock:
            done, self._finished = self._finished, []
        return done

    def has_pending(self) -> bool:
        return bool(self._finished) or self.tiers.has_residency_changes()

    def _residency_changed(self) -> None:
        self._wake()

    def _flush_residency(self) -> None:
        if self._record_event is None:
            self.tiers.drain_residency()
            return
        for medium, stored, hashes in self.tiers.drain_residency():
            if stored:
                self._record_event(BlocksStored([StoredBlock(h, []) for h in hashes], medium=medium))
            else:
                self._record_event(BlocksRemoved(list(hashes), medium=medium))


def model_identity(model_path: str) -> str:
    """The model part of a block's identity: the model's name and its config.json digest."""
    path = Path(model_path)
    config = path / "config.json"
    digest = f"{xxhash.xxh3_64_intdigest(config.read_bytes()):016x}" if config.is_file() else ""
    return f"{path.name or model_path}:{digest}"


def layout_identity(layout: KvLayout) -> str:
    """The layout part of a block's identity: everything that shapes one block's bytes."""
    return (f"L{layout.num_layers} H{layout.num_kv_heads} D{layout.head_dim} "
            f"bs{layout.block_size} {layout.dtype} {','.join(layout.axes)}")


def tier_connector_factory(config: TierConfig, model: str,
                           registry: CollectorRegistry | None = None) -> ConnectorFactory:
    """A ConnectorFactory (EngineHooks.make_connector) that builds the tiers once the
    engine's KV memory, and so its layout, exists."""

    def make(kv: EngineKv) -> TierConnector:
        layout = kv.io.layout
        identity = KvIdentity(model, layout_identity(layout))
        whole = kv.io.device_tensor()
        pin = isinstance(whole, torch.Tensor) and whole.device.type == "cuda"
        tiers = TieredKvCache(config, identity, layout.block_bytes, layout.block_size,
                              registry=registry, pin_host=pin)
        return TierConnector(tiers, kv.io, layout.block_size, kv.wake, kv.record_event)

    return make
