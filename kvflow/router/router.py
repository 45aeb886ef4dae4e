"""`KvRouter`: the KV-cache-aware router — index, load, policy, admission and replica sync.

One decision reads aloud: hash the prompt → wait for a non-busy worker → score the
candidates (cached prefix — exact, pending or session history — against load) and pick
one → book the request's load, its prompt blocks as pending on the chosen worker, and
its session. Engines' KV events and load metrics, discovery changes and peer replicas'
decisions flow in through the `on_*` methods; the caller owns every transport.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from kvflow.llm.kv_events import KvEvent, KvEventBatch, LoadMetrics
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.router.admission import AdmissionQueue, AdmissionStats
from kvflow.router.approximate import ApproxIndex
from kvflow.router.blocks import OverlapIndex, OverlapScores
from kvflow.router.config import KvRouterConfig
from kvflow.router.cost import RoutingDecision, predicted_hit_rate
from kvflow.router.errors import NoWorkersError, RouterOverloadedError, UnknownWorkerError
from kvflow.router.indexer import KvIndex
from kvflow.router.load import ActiveLoad, WorkerLoad
from kvflow.router.metrics import RouterMetrics
from kvflow.router.pending import PendingBlocks
from kvflow.router.policies import DirectPolicy, KvPolicy, RoutingSnapshot, build_router_policy
from kvflow.router.recovery import FetchSnapshot, GapRecovery, RecoveryStats
from kvflow.router.sessions import SessionAffinity
from kvflow.router.sync import RoutingSyncMessage, SyncKind, remote_key
from kvflow.router.tiers import worker_tier_metrics

PublishSync = Callable[[RoutingSyncMessage], None]
# Candidate workers: a fixed list, or a function asked again each time a held request
# looks for room (so a worker that joins while it waits can take it).
Candidates = Sequence[int] | Callable[[], Sequence[int]]
_TOMBSTONES = 4096


@dataclass
class _Request:
    """A request prepared for routing: its prompt blocks and candidate workers."""

    num_tokens: int
    block_hashes: list[int]
    candidates: list[int]
    pinned_worker: int | None
    session_id: str | None = None
    refresh: Callable[[], Sequence[int]] | None = None
    fresh: bool = True  # `candidates` were just asked for: the first room check uses them

    def current(self) -> list[int]:
        """The candidates now (kept in `candidates`): on a later check (the request waited)
        asked again when they follow the fleet, else as given."""
        if self.fresh:
            self.fresh = False
        elif self.refresh is not None and self.pinned_worker is None:
            self.candidates = list(dict.fromkeys(self.refresh()))
        return self.candidates


@dataclass(frozen=True)
class RouterStats:
    workers: list[int]
    index_blocks: int
    active_requests: int
    admission: AdmissionStats
    recovery: RecoveryStats | None


class KvRouter:
    def __init__(
        self,
        config: KvRouterConfig,
        fetch_snapshot: FetchSnapshot | None = None,
        *,
        registry: CollectorRegistry | None = None,
        name: str = "default",
        replica_id: str | None = None,
        publish_sync: PublishSync | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.replica_id = replica_id or uuid.uuid4().hex
        self._publish_sync = publish_sync
        self._kv_index: KvIndex | None = None
        self._approx: ApproxIndex | None = None
        self._recovery: GapRecovery | None = None
        self._index: OverlapIndex = self._build_index(fetch_snapshot, clock)
        self._pending: PendingBlocks | None = None
        if config.use_kv_events and config.pending_ttl_s > 0:
            self._pending = PendingBlocks(config.pending_ttl_s, clock)
        self._sessions = SessionAffinity(config.session_ttl_s, config.max_sessions, clock)
        self._load = ActiveLoad()
        self._policy = build_router_policy(config)
        self._direct = DirectPolicy(config)
        self._admission = AdmissionQueue(config.max_queue, config.queue_timeout_s,
                                         config.retry_after_s)
        self._rng = random.Random(config.seed)
        self._metrics_registry = registry if registry is not None else CollectorRegistry()
        self._metrics = RouterMetrics(self._metrics_registry, name, self._admission.waiting,
                                      self._index.num_blocks)
        self._tier_metrics = worker_tier_metrics(self._metrics_registry)
        self._name = name
        self._workers: dict[int, None] = {}
        self._removed: dict[int, None] = {}
        self._decisions = 0

    def _build_index(self, fetch: FetchSnapshot | None, clock: Callable[[], float]) -> OverlapIndex:
        cfg = self.config
        if not cfg.use_kv_events:
            self._approx = ApproxIndex(cfg.approx_ttl_s, cfg.approx_max_blocks, clock)
            return self._approx
        if fetch is None:
            raise ValueError("a KV-event router needs fetch_snapshot (to recover from missed "
                             "events); pass one, or set use_kv_events=False for approximate mode")
        self._kv_index = KvIndex(cfg.first_event_id)
        self._recovery = GapRecovery(self._kv_index, fetch, attempts=cfg.recovery_attempts,
                                     backoff_s=cfg.recovery_backoff_s,
                                     max_buffered=cfg.max_buffered_events)
        return self._kv_index

    # --- routing -------------------------------------------------------------------
    async def schedule(
        self,
        token_ids: Sequence[int],
        request_id: str,
        lora_name: str | None = None,
        worker_ids: Candidates | None = None,
        *,
        pinned_worker: int | None = None,
        block_hashes: Sequence[int] | None = None,
        cache_salt: str | None = None,
        session_id: str | None = None,
    ) -> RoutingDecision:
        """Pick a worker for the request and book its load there.

        Calling it again for a booked request_id (migration) moves the booking.
        `worker_ids`: None = every worker the router knows, or a function returning the
        candidates (both follow workers that join while the request waits), or a fixed list.
        Waits while every candidate is busy; raises `RouterOverloadedError` when the wait
        queue is full or the wait times out, `NoWorkersError` / `UnknownWorkerError` when
        there is nothing (or not the named worker) to route to.
        """
        request = self._prepare(token_ids, lora_name, worker_ids, pinned_worker, block_hashes,
                                cache_salt, session_id)
        try:
            await self._admission.admit(lambda: self._has_room(request))
        except RouterOverloadedError:
            self._metrics.rejected.inc()
            raise
        try:
            start = time.perf_counter()
            decision = self._decide(request, self._rng)
            self._book(request_id, request, decision)
            self._metrics.observe(decision, time.perf_counter() - start)
        finally:
            self._admission.done()
        return decision

    def explain(
        self,
        token_ids: Sequence[int],
        lora_name: str | None = None,
        worker_ids: Sequence[int] | None = None,
        *,
        pinned_worker: int | None = None,
        cache_salt: str | None = None,
        session_id: str | None = None,
    ) -> RoutingDecision:
        """The decision `schedule` would make now, without changing any state."""
        request = self._prepare(token_ids, lora_name, worker_ids, pinned_worker, None,
                                cache_salt, session_id)
        rng = random.Random()
        rng.setstate(self._rng.getstate())
        return self._decide(request, rng, explain=True)

    def _prepare(
        self,
        token_ids: Sequence[int],
        lora_name: str | None,
        worker_ids: Candidates | None,
        pinned: int | None,
        block_hashes: Sequence[int] | None,
        cache_salt: str | None = None,
        session_id: str | None = None,
    ) -> _Request:
        refresh: Callable[[], Sequence[int]] | None
        if worker_ids is None:
            refresh = lambda: list(self._workers)  # noqa: E731
        elif callable(worker_ids):
            refresh = worker_ids
        else:
            refresh = None
        candidates = list(dict.fromkeys(refresh() if refresh is not None else worker_ids))
        if not candidates:
            raise NoWorkersError("no workers are available to route to; start a worker or "
                                 "wait for one to register")
        if pinned is not None:
            if pinned not in candidates:
                raise UnknownWorkerError(f"the request names worker {pinned}, which is not "
                                         f"available; available workers: {sorted(candidates)}")
            candidates = [pinned]
        if block_hashes is None:
            block_hashes = sequence_hashes(token_ids, self.config.block_size, lora_name=lora_name,
                                           salt=cache_salt)
        return _Request(len(token_ids), list(block_hashes), candidates, pinned, session_id or None,
                        refresh)

    def _has_room(self, request: _Request) -> bool:
        cfg = self.config
        if not cfg.has_busy_threshold:
            return True  # (without asking a function for the candidates: the hot path)
        return any(not cfg.is_busy(self._load.load(w))
                   for w in request.current() if w not in self._removed)

    def _decide(self, request: _Request, rng: random.Random, explain: bool = False) -> (
            RoutingDecision):
        cfg = self.config
        # As of `_prepare`, or of the room check that let a held request go.
        candidates = [w for w in request.candidates if w not in self._removed]
        if not candidates:  # they left while the request waited
            raise NoWorkersError(f"workers {sorted(request.candidates)} left before the request "
                                 "could be routed; retry it")
        hashes = request.block_hashes
        loads = self._load.snapshot(candidates)
        overlaps, pending = self._match(hashes, loads)
        eligible = self._eligible(loads)
        hint = self._sessions.lookup(request.session_id, hashes) if request.session_id else None
        snapshot = RoutingSnapshot(request.num_tokens, eligible, overlaps,
                                   self._decisions, request.pinned_worker,
                                   session_worker=hint.worker_id if hint else None,
                                   session_blocks=hint.blocks if hint else 0,
                                   prefix_key=hashes[0] if hashes else 0)
        policy = self._policy if request.pinned_worker is None else self._direct
        choice = policy.select(snapshot, rng)
        scores = snapshot.overlap_scores()
        overlap = scores.get(choice.worker_id, 0)
        terms = policy.terms(snapshot) if explain and isinstance(policy, KvPolicy) else {}
        return RoutingDecision(
            worker_id=choice.worker_id,
            overlap_blocks=overlap,
            request_blocks=len(request.block_hashes),
            num_tokens=request.num_tokens,
            predicted_hit_rate=predicted_hit_rate(overlap, request.num_tokens, cfg.block_size),
            policy=policy.name,
            costs=choice.costs,
            overlaps={w: scores.get(w, 0) for w in loads},
            loads=loads,
            terms=terms,
            pending=pending,
            session_worker=snapshot.session_worker,
            session_blocks=snapshot.session_blocks,
        )

    def _match(self, hashes: list[int], loads: Mapping[int, WorkerLoad]) -> tuple[OverlapScores,
                                                                                  dict[int, int]]:
        """Leading blocks per worker: the index's, extended by blocks pending there (whole
        blocks), then by lower KV tiers credited at their worth, their load time overlapping
        the prefill queued on the worker (router/tiers.py)."""
        overlaps = self._index.find_matches(hashes)
        extra = self._pending.extend(hashes, overlaps.scores, loads) if self._pending else {}
        if extra:
            scores = dict(overlaps.scores)
            for w, n in extra.items():
                scores[w] = scores.get(w, 0) + n
            overlaps = OverlapScores(scores, overlaps.frequencies)
        if self._kv_index is not None and self._kv_index.tiers:
            overlaps = self._kv_index.tiers.extend(hashes, overlaps, loads, self.config.block_size)
        return overlaps, extra

    def _eligible(self, loads: dict[int, WorkerLoad]) -> dict[int, WorkerLoad]:
        """Candidates under the busy thresholds (all of them when none is, for explain)."""
        cfg = self.config
        if not cfg.has_busy_threshold:
            return loads
        free = {w: load for w, load in loads.items() if not cfg.is_busy(load)}
        return free or loads

    def _book(self, request_id: str, request: _Request, decision: RoutingDecision) -> None:
        if self._load.worker_of(request_id) is not None:
            self.on_finished(request_id)  # routed again (migration): the old booking ends
        block_size = self.config.block_size
        worker, hashes = decision.worker_id, request.block_hashes
        prefill = max(request.num_tokens - decision.overlap_blocks * block_size, 0)
        decode = -(-request.num_tokens // block_size)
        self._load.add(request_id, worker, prefill, decode)
        self._decisions += 1
        if self._approx is not None:
            self._approx.record(worker, hashes)
            shared = hashes
        elif self._pending is not None:
            # what the worker will newly store (a lower-tier credit may be fractional)
            shared = hashes[int(decision.overlap_blocks):]
            self._pending.book(worker, shared)
        else:
            shared = []
        session = request.session_id
        if session:
            self._sessions.record(session, worker, len(hashes), hashes[-1] if hashes else 0)
        self._send_sync("added", request_id, worker, prefill, decode, shared, session,
                        len(hashes), hashes[-1] if hashes else 0)

    # --- request lifecycle ---------------------------------------------------------
    def on_first_token(self, request_id: str) -> None:
        """The request's first token arrived: its prefill no longer loads its worker."""
        worker = self._load.worker_of(request_id)
        if self._load.mark_prefill_done(request_id):
            self._send_sync("prefill_done", request_id, worker or 0)
            self._admission.pump()

    def on_finished(self, request_id: str) -> None:
        """The request ended (any reason): drop its load. Safe to call more than once."""
        worker = self._load.worker_of(request_id)
        if self._load.free(request_id):
            self._send_sync("freed", request_id, worker or 0)
            self._admission.pump()

    # --- inputs from engines and discovery ------------------------------------------
    def on_kv_events(self, batch: KvEventBatch | Sequence[KvEvent]) -> None:
        events = batch.events if isinstance(batch, KvEventBatch) else batch
        if self._recovery is None:
            return  # approximate mode ignores KV events
        events = [e for e in events if e.worker_id not in self._removed]
        if self._pending is not None:
            self._pending.apply(events)  # stored blocks confirm, removed ones refute
        self._sessions.apply(events)  # an evicted history refutes its session
        self._recovery.handle(events)

    def on_load_metrics(self, metrics: LoadMetrics) -> None:
        if metrics.worker_id in self._removed:
            return
        self._load.update_metrics(metrics)
        if self._kv_index is not None:
            self._kv_index.tiers.observe_costs(metrics)
        self._tier_metrics.update(self._name, metrics)
        self._admission.pump()

    def on_worker_added(self, worker_id: int) -> None:
        self._removed.pop(worker_id, None)
        self._workers[worker_id] = None
        self._admission.pump()

    def on_worker_removed(self, worker_id: int) -> None:
        """Forget the worker: its cached blocks, pending recovery and booked load."""
        self._workers.pop(worker_id, None)
        self._tier_metrics.forget(self._name, worker_id)
        self._index.remove_worker(worker_id)
        if self._pending is not None:
            self._pending.clear_worker(worker_id)
        self._sessions.remove_worker(worker_id)
        if self._recovery is not None:
            self._recovery.remove_worker(worker_id)
        self._load.remove_worker(worker_id)
        self._removed[worker_id] = None
        if len(self._removed) > _TOMBSTONES:
            del self._removed[next(iter(self._removed))]
        self._admission.pump()

    # --- replica sync --------------------------------------------------------------
    def _send_sync(self, kind: SyncKind, request_id: str, worker_id: int, prefill: int = 0,
                   decode: int = 0, hashes: list[int] | None = None, session: str | None = None,
                   session_blocks: int = 0, session_hash: int = 0) -> None:
        if self._publish_sync is None:
            return
        self._publish_sync(RoutingSyncMessage(self.replica_id, request_id, kind, worker_id,
                                              prefill, decode, hashes or [], session or "",
                                              session_blocks, session_hash))

    def apply_sync(self, message: RoutingSyncMessage) -> None:
        """Apply a peer replica's decision or lifecycle change; our own are ignored."""
        if message.replica_id == self.replica_id or message.worker_id in self._removed:
            return
        key = remote_key(message.replica_id, message.request_id)
        if message.kind == "added":
            if self._load.worker_of(key) is None:
                self._load.add(key, message.worker_id, message.prefill_tokens,
                               message.decode_blocks)
            self._apply_peer_blocks(message)
        elif message.kind == "prefill_done":
            self._load.mark_prefill_done(key)
        else:
            self._load.free(key)
        self._admission.pump()

    def _apply_peer_blocks(self, message: RoutingSyncMessage) -> None:
        """A peer's decision: its prompt blocks (approximate index or pending) and session."""
        worker = message.worker_id
        if message.block_hashes:
            if self._approx is not None:
                self._approx.record(worker, message.block_hashes)
            elif self._pending is not None:
                self._pending.book(worker, message.block_hashes)
        if message.session_id:
            self._sessions.record(message.session_id, worker, message.session_blocks,
                                  message.session_hash)

    def on_replica_removed(self, replica_id: str) -> None:
        """A peer replica left: drop the load it had booked."""
        prefix = remote_key(replica_id, "")
        self._load.remove_requests(k for k in self._load.request_ids() if k.startswith(prefix))
        self._admission.pump()

    # --- introspection and shutdown -------------------------------------------------
    @property
    def index(self) -> OverlapIndex:
        return self._index

    @property
    def active_load(self) -> ActiveLoad:
        return self._load

    def stats(self) -> RouterStats:
        recovery = self._recovery.stats() if self._recovery is not None else None
        return RouterStats(list(self._workers), self._index.num_blocks(), len(self._load.request_ids()),
                           self._admission.stats(), recovery)

    async def wait_recovered(self) -> None:
        if self._recovery is not None:
            await self._recovery.wait_idle()

    async def close(self) -> None:
        if self._recovery is not None:
            await self._recovery.close()
