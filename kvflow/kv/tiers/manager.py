"""TieredKvCache: offload device blocks to G2/G3/G4 and load them back when that pays.

Engine-agnostic (torch only for the host tier's slab, imported when one is built):
blocks are bytes addressed by sequence hash. The engine
calls `offload` with a block's KV when the device pool evicts it (write-back) or as
soon as it is computed (write-through), and `load` / `prefetch` for the blocks after
its device prefix hit. Tiers are inclusive: an offloaded block goes to host memory at
once (if configured) and, from a writer thread, to disk (when the admission filter
admits it) and to the object store. A load walks the blocks in order and takes each
from the fastest tier holding it, stopping at the first block that is missing,
refused (checksum, identity) or predicted slower to load than to recompute.

Faults: a store that raises `TierUnavailable` is skipped for `tier_retry_s` with one
warning per outage and a metric; every other tier, and serving, carry on.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client import CollectorRegistry

from kvflow.kv.tiers.admission import AdmissionFilter
from kvflow.kv.tiers.config import TierConfig
from kvflow.kv.tiers.host import HostStore
from kvflow.kv.tiers.metrics import TierMetrics
from kvflow.kv.tiers.policy import LoadCostModel
from kvflow.kv.tiers.record import (
    BlockRejected,
    KvIdentity,
    check_header,
    check_payload,
    decode_record,
    encode_record,
)
from kvflow.kv.tiers.store import KvStore, TierUnavailable

log = logging.getLogger(__name__)
OFFLOAD_QUEUE = 4096
PROBE_LIMIT = 512  # blocks of one prompt asked of the object store at admission
T = TypeVar("T")


@dataclass
class LoadedRun:
    """Leading blocks found below the device: their hashes, source tiers and KV.

    A block from the host tier stays in its (pinned) slab slot, `slots[i]`, and its
    `payloads[i]` is None. A block from disk or the object store was read (and checked)
    straight into a host slot reserved for it — `slots[i]`, payload None, promoted to the
    host tier once the engine copied it (`take_promoted`) — or, with no host tier or no
    free slot, has its KV bytes in `payloads[i]` and slot -1. `release` unpins the host
    slots and gives back promoted slots nobody took.
    """

    hashes: list[int] = field(default_factory=list)
    payloads: list[memoryview | None] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    host: HostStore | None = None

    def __len__(self) -> int:
        return len(self.hashes)

    def by_tier(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tier in self.tiers:
            counts[tier] = counts.get(tier, 0) + 1
        return counts

    def payload(self, i: int) -> memoryview:
        """Block i's KV bytes, wherever it came from."""
        data = self.payloads[i]
        if data is not None:
            return data
        assert self.host is not None
        return self.host.payload(self.slots[i])

    def host_slots(self) -> list[int]:
        """Slots of the blocks that came from the host tier (pinned there)."""
        return [s for s, t in zip(self.slots, self.tiers, strict=True) if s >= 0 and t == "host"]

    def take_promoted(self) -> tuple[list[int], list[int]]:
        """(hashes, slots) of the disk/object blocks read into reserved host slots; they
        are the caller's to commit from now on (release no longer gives them back)."""
        hashes, slots = [], []
        for i, (slot, tier) in enumerate(zip(self.slots, self.tiers, strict=True)):
            if slot >= 0 and tier != "host":
                hashes.append(self.hashes[i])
                slots.append(slot)
                self.payloads[i] = self.payload(i)  # a view of the slot, while host keeps it
                self.slots[i] = -1
        return hashes, slots

    def release(self) -> None:
        """Unpin the host slots this run holds (once their KV is copied) and give back the
        reserved slots of promoted blocks not taken; idempotent."""
        if self.host is not None:
            self.host.release(self.host_slots())
            self.host.unreserve([s for s, t in zip(self.slots, self.tiers, strict=True)
                                 if s >= 0 and t != "host"])
            self.host = None
            self.slots = [-1] * len(self.slots)

    def extend(self, other: LoadedRun) -> None:
        self.hashes += other.hashes
        self.payloads += other.payloads
        self.tiers += other.tiers
        self.slots += other.slots


def build_stores(config: TierConfig, identity: KvIdentity, on_error: Callable[[TierUnavailable], None],
                 block_bytes: int, pin_host: bool = False) -> list[KvStore]:
    """The configured stores, fastest first; one that cannot start is reported and left out."""
    from kvflow.kv.tiers.disk import DiskStore

    stores: list[KvStore] = []
    if config.host_bytes:
        stores.append(HostStore(config.host_bytes, block_bytes, identity=identity.fingerprint,
                                pin=pin_host))
    try:
        if config.disk_kv_cache_dir:
            stores.append(DiskStore(config.disk_kv_cache_dir, config.disk_bytes, identity.key_prefix))
        if config.kv_object_store:
            from kvflow.kv.tiers.object_store import S3Store

            stores.append(S3Store(config.kv_object_store, identity.key_prefix,
                                  endpoint_url=config.kv_object_store_endpoint,
                                  timeout_s=config.kv_object_store_timeout_s))
    except TierUnavailable as exc:
        on_error(exc)
    return stores


class TieredKvCache:
    """The tiers below one engine's device cache, with their policy and metrics."""

    def __init__(self, config: TierConfig, identity: KvIdentity, block_bytes: int, block_size: int,
                 *, registry: CollectorRegistry | None = None, stores: list[KvStore] | None = None,
                 pin_host: bool = False) -> None:
        self.config = config
        self.identity = identity
        self.metrics = TierMetrics(registry)
        self.costs = LoadCostModel(block_bytes, block_size, always=config.kv_onboard == "always")
        self.admission = AdmissionFilter(config.disk_admit_after, config.disk_admission_window)
        self._fingerprint = identity.fingerprint
        self._down_until: dict[str, float] = {}
        self._fault_lock = threading.Lock()
        self.block_bytes = block_bytes
        self.stores = stores if stores is not None else build_stores(
            config, identity, self._report, block_bytes, pin_host)
        self.host: HostStore | None = next(
            (s for s in self.stores if isinstance(s, HostStore)), None)
        self._lower = [s for s in self.stores if s is not self.host]
        # (hash, record) to write below host; record None: read it from the host slab then
        self._queue: queue.Queue[tuple[int, bytes | None] | None] = queue.Queue(OFFLOAD_QUEUE)
        self._writer = threading.Thread(target=self._write_loop, name="kv-offload", daemon=True)
        self._writer.start()
        self._prefetcher = ThreadPoolExecutor(8, thread_name_prefix="kv-prefetch")
        self._fetcher = ThreadPoolExecutor(8, thread_name_prefix="kv-fetch")  # disk/object reads
        # Residency changes (medium, stored?, hashes) for KV events; `on_residency` is
        # called when the writer thread adds some (the engine thread drains them).
        self._residency: list[tuple[str, bool, list[int]]] = []
        self._residency_lock = threading.Lock()
        self.on_residency: Callable[[], None] | None = None
        for store in self.stores:
            if hasattr(store, "on_evict"):
                store.on_evict = functools.partial(self._note_residency, store.tier, False)

    @property
    def tiers(self) -> list[str]:
        return [s.tier for s in self.stores]

    def has_shared_tier(self) -> bool:
        return any(s.shared for s in self.stores)

    # ---- faults ---------------------------------------------------------------------

    def _report(self, exc: TierUnavailable) -> None:
        self.metrics.errors.labels(exc.tier, exc.reason).inc()
        with self._fault_lock:  # parallel probes may fail together: still one warning
            first = exc.tier not in self._down_until
            self._down_until[exc.tier] = time.monotonic() + self.config.tier_retry_s
        if first:
            log.warning("%s; skipping this tier for %.0fs, serving continues without it",
                        exc, self.config.tier_retry_s)

    def available(self, store: KvStore) -> bool:
        until = self._down_until.get(store.tier)
        return until is None or time.monotonic() >= until

    def _guard(self, store: KvStore, fn: Callable[..., T], *args: object) -> T | None:
        if not self.available(store):
            return None
        try:
            result = fn(*args)
        except TierUnavailable as exc:
            self._report(exc)
            return None
        if self._down_until.pop(store.tier, None) is not None:
            log.info("KV tier %r is back", store.tier)
        return result

    # ---- residency (what each tier holds, for routers) ---------------------------------

    def _note_residency(self, tier: str, stored: bool, seq_hash: int) -> None:
        with self._residency_lock:
            last = self._residency[-1] if self._residency else None
            if last is not None and last[0] == tier and last[1] == stored:
                last[2].append(seq_hash)
            else:
                self._residency.append((tier, stored, [seq_hash]))

    def has_residency_changes(self) -> bool:
        return bool(self._residency)

    def drain_residency(self) -> list[tuple[str, bool, list[int]]]:
        with self._residency_lock:
            out, self._residency = self._residency, []
        return out

    def holds_below(self, seq_hash: int) -> bool:
        """Some local tier (host, disk) already holds this block (no I/O)."""
        return any(not s.shared and s.contains(seq_hash) for s in self.stores)

    # ---- offload --------------------------------------------------------------------

    def note_use(self, hashes: Sequence[int]) -> None:
        """One request used these blocks (computed or hit): feeds the disk admission filter."""
        self.admission.note(hashes)

    def offload(self, seq_hash: int, payload: bytes | memoryview) -> None:
        """Save one block's KV below the device: host now, disk and object store soon."""
        if self.host is not None and self.host.put_payload(seq_hash, payload):
            self.metrics.offloaded("host", len(payload))
            self._note_residency("host", True, seq_hash)
        if self._lower:
            self._enqueue(seq_hash, encode_record(self._fingerprint, seq_hash, payload))

    def stored_on_host(self, hashes: Sequence[int], slots: Sequence[int]) -> None:
        """Blocks just copied into reserved host slots (a batched offload): index them,
        count them, and queue them for the lower tiers (read back from the slab there)."""
        assert self.host is not None
        self.host.commit(hashes, slots)
        self.metrics.offloaded_many("host", len(hashes), len(hashes) * self.block_bytes)
        with self._residency_lock:
            self._residency.append(("host", True, list(hashes)))
        if self._lower:
            for seq_hash in hashes:
                self._enqueue(seq_hash, None)

    def promoted_to_host(self, hashes: Sequence[int], slots: Sequence[int]) -> None:
        """Blocks loaded from disk/object were copied into reserved host slots: index them
        there (they are already below, so nothing is queued for the lower tiers)."""
        assert self.host is not None
        self.host.commit(hashes, slots)
        with self._residency_lock:
            self._residency.append(("host", True, list(hashes)))

    def map_io(self, fn: Callable[[T], object], items: Sequence[T]) -> Iterator[object]:
        """`fn` over `items` on the I/O threads (byte copies and reads release the GIL)."""
        return self._fetcher.map(fn, items)

    def _enqueue(self, seq_hash: int, record: bytes | None) -> None:
        try:
            self._queue.put_nowait((seq_hash, record))
        except queue.Full:
            self.metrics.dropped.labels("all").inc()

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            seq_hash, record = item
            if record is None and self.host is not None:
                record = self.host.get(seq_hash)  # checksummed here, off the engine's path
            if record is None:
                self.metrics.dropped.labels("all").inc()  # left host before it was written
            else:
                for store in self._lower:
                    self._write(store, seq_hash, record)
            self._queue.task_done()

    def _write(self, store: KvStore, seq_hash: int, record: bytes) -> None:
        if store.tier == "disk" and not self.admission.admits(seq_hash):
            return
        if self._guard(store, store.contains, seq_hash) is not False:
            return  # already there (content-addressed), or the tier is down
        if self._guard(store, store.put, seq_hash, record):
            self.metrics.offloaded(store.tier, len(record))
            self._note_residency(store.tier, True, seq_hash)
            if self.on_residency is not None:
                self.on_residency()

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until queued offloads are written (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    # ---- onboard --------------------------------------------------------------------

    def probe(self, hashes: Sequence[int]) -> list[str]:
        """For the leading run of `hashes` held below the device and worth loading, the
        tier each block would come from. The object store is asked about every block no
        local tier holds at once, in parallel (one round trip, not one per block)."""
        shared = self._shared_presence(hashes)
        tiers: list[str] = []
        for seq_hash in hashes:
            tier = self._probe_one(seq_hash, shared)
            if tier is None:
                break
            tiers.append(tier)
        return tiers

    def _shared_presence(self, hashes: Sequence[int]) -> dict[int, bool]:
        stores = [s for s in self.stores if s.shared and self.available(s)]
        if not stores:
            return {}
        ask = [h for h in hashes[:PROBE_LIMIT] if not self.holds_below(h)]
        answers = self._prefetcher.map(lambda h: bool(self._guard(stores[0], stores[0].contains, h)), ask)
        return dict(zip(ask, answers, strict=True))

    def _probe_one(self, seq_hash: int, shared: dict[int, bool]) -> str | None:
        for store in self.stores:
            present = shared.get(seq_hash, False) if store.shared else self._guard(
                store, store.contains, seq_hash)
            if not present:
                continue
            if self.costs.worth_loading(store.tier, 1):
                return store.tier
            self.metrics.skipped.labels(store.tier).inc()
            return None
        return None

    def load(self, hashes: Sequence[int]) -> LoadedRun:
        """The leading run of `hashes` found below the device and worth loading.

        Host blocks are pinned in their slots (no copy here; `landed` unpins them and
        counts them once the engine copied them); runs of blocks from disk or the object
        store are fetched and checked in parallel."""
        run = LoadedRun(host=self.host)
        hashes = list(hashes)
        i = 0
        while i < len(hashes):
            got = self._host_run(hashes[i:])
            if not got:
                got = self._lower_run(hashes[i:])
            if not got:
                break
            run.extend(got)
            i += len(got)
        return run

    def _host_run(self, hashes: list[int]) -> LoadedRun:
        host = self.host
        if host is None or not host.contains(hashes[0]):
            return LoadedRun()
        if not self.costs.worth_loading("host", 1):
            self.metrics.skipped.labels("host").inc()
            return LoadedRun()
        slots = host.acquire_run(hashes)
        self.metrics.lookup_many("host", len(slots), len(slots))
        n = len(slots)
        return LoadedRun(hashes[:n], [None] * n, ["host"] * n, slots)

    def _lower_run(self, hashes: list[int]) -> LoadedRun:
        """The leading blocks of `hashes` no host holds, from disk/object, in parallel;
        each read straight into a host slot reserved for it when there is one."""
        host = self.host
        end = next((j for j, h in enumerate(hashes) if host is not None and host.contains(h)),
                   len(hashes))
        slots = host.reserve(end) if host is not None and end else []

        def fetch(k: int) -> tuple[str, memoryview] | None:
            into = host.payload(slots[k]) if host is not None and k < len(slots) else None
            return self._load_one(hashes[k], into)

        run = LoadedRun()
        started = time.perf_counter()
        try:
            for k, found in enumerate(self._fetcher.map(fetch, range(end))):
                if found is None:
                    break
                run.hashes.append(hashes[k])
                run.tiers.append(found[0])
                into = k < len(slots)
                run.payloads.append(None if into else found[1])
                run.slots.append(slots[k] if into else -1)
        except BaseException:
            if host is not None:
                host.unreserve(slots)
            raise
        if host is not None:
            host.unreserve(slots[len(run):])  # after the first miss: read for nothing
        if len(run) and len(set(run.tiers)) == 1:
            # The reads ran side by side: a block's cost is the run's time over its size. A run
            # mixing tiers (disk and object store) says nothing about either alone: not counted.
            self.costs.observe_load(run.tiers[0], len(run), time.perf_counter() - started)
        return run

    def landed(self, run: LoadedRun, seconds: float) -> None:
        """The engine copied `run` into its cache in `seconds`: count the host part (its
        copy is the host tier's load time), index the disk/object blocks read into host
        slots as host blocks, and unpin the slots."""
        n = len(run.host_slots())
        if n:
            self.costs.observe_load("host", n, seconds)
            self.metrics.onboarded("host", n, n * self.block_bytes, seconds)
        promoted, slots = run.take_promoted()
        if promoted:
            self.promoted_to_host(promoted, slots)
        run.release()

    def prefetch(self, hashes: Sequence[int]) -> Future[LoadedRun]:
        """`load` on a background thread, so the I/O overlaps the request's queueing."""
        return self._prefetcher.submit(self.load, list(hashes))

    def _load_one(self, seq_hash: int, into: memoryview | None = None
                  ) -> tuple[str, memoryview] | None:
        """The block from the first lower tier holding it (checked), read into `into`
        when given."""
        for store in self._lower:
            if not self.available(store) or (not store.shared and not store.contains(seq_hash)):
                continue
            if not self.costs.worth_loading(store.tier, 1):
                self.metrics.skipped.labels(store.tier).inc()
                return None
            payload = self._fetch(store, seq_hash, into)
            if payload is not None:
                return store.tier, payload
        return None

    def _read(self, store: KvStore, seq_hash: int, into: memoryview | None
              ) -> memoryview | None:
        """The block's checked payload (in `into` when given); BlockRejected if refused."""
        read_into = getattr(store, "read_into", None)
        if into is not None and read_into is not None:
            got = self._guard(store, read_into, seq_hash, into)
            self.metrics.lookup(store.tier, got is not None)
            if got is None:
                return None
            length, digest = check_header(got[0], self._fingerprint, seq_hash)
            check_payload(got[1], length, digest, seq_hash)
            return got[1]
        record = self._guard(store, store.get, seq_hash)
        self.metrics.lookup(store.tier, record is not None)
        if record is None:
            return None
        payload = decode_record(record, self._fingerprint, seq_hash)
        if into is not None:
            into[:] = payload
            return into
        return payload

    def _fetch(self, store: KvStore, seq_hash: int, into: memoryview | None = None
               ) -> memoryview | None:
        started = time.perf_counter()
        try:
            payload = self._read(store, seq_hash, into)
            if payload is None:
                return None
        except BlockRejected as exc:
            self.metrics.rejected.labels(store.tier, exc.reason).inc()
            log.warning("KV tier %r: refused block %016x (%s); it will be recomputed",
                        store.tier, seq_hash, exc)
            self._guard(store, store.discard, seq_hash)
            return None
        self.metrics.onboarded(store.tier, 1, len(payload), time.perf_counter() - started)
        return payload

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10)
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self._fetcher.shutdown(wait=True, cancel_futures=True)
