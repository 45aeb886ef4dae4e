"""A `KvRouter` wired to the distributed runtime: event feeds, snapshots, routed streams.

`KvRoutedClient` is an engine client (the frontend's `EngineClient` shape): it follows
the workers of one generate endpoint through discovery, feeds their KV events and load
metrics into a `KvRouter`, shares decisions with router replicas, fetches snapshots
for gap recovery, and streams each request from the worker the router picks.

Wire conventions (names in `RouterWiring`):
- workers publish `KvEventBatch` and `LoadMetrics` (msgpack) on the namespace subjects
  `kv_events` / `load_metrics`, with `worker_id` = their generate instance id;
- each worker serves `<component>.kv_snapshot` under the same instance id: any request
  → one `CacheSnapshot`;
- router replicas exchange `RoutingSyncMessage` on `router_sync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from kvflow.llm.kv_events import (
    KV_EVENTS_SUBJECT,
    LOAD_METRICS_SUBJECT,
    CacheSnapshot,
    KvEventBatch,
    LoadMetrics,
)
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.router.config import KvRouterConfig
from kvflow.router.cost import RoutingDecision
from kvflow.router.observe import RouterObserver, RouterView, WorkerView
from kvflow.router.router import Candidates, KvRouter
from kvflow.router.sync import ROUTER_SYNC_SUBJECT, RoutingSyncMessage, decode_sync, encode_sync
from kvflow.runtime.component import PingResult
from kvflow.runtime.context import Context
from kvflow.runtime.discovery.base import PUT
from kvflow.runtime.errors import KvflowError

if TYPE_CHECKING:
    from kvflow.runtime.runtime import DistributedRuntime

log = logging.getLogger(__name__)
ROUTER_REPLICAS_PREFIX = "v1/routers/"


@dataclass(frozen=True)
class RouterWiring:
    """Where the router finds its workers and their events."""

    namespace: str = "kvflow"
    component: str = "backend"
    generate_endpoint: str = "generate"
    snapshot_endpoint: str = "kv_snapshot"
    kv_events_subject: str = KV_EVENTS_SUBJECT
    load_metrics_subject: str = LOAD_METRICS_SUBJECT
    sync_subject: str = ROUTER_SYNC_SUBJECT
    snapshot_timeout_s: float = 5.0


class SnapshotRequest(msgspec.Struct):
    """What the router sends to a worker's snapshot endpoint."""

    worker_id: int


class SnapshotUnavailableError(KvflowError):
    """A worker's snapshot endpoint answered nothing."""


class KvRoutedClient:
    """Streams requests from the worker a `KvRouter` picks; build with `await start(...)`."""

    def __init__(self, runtime: DistributedRuntime, config: KvRouterConfig, wiring: RouterWiring,
                 name: str) -> None:
        self.wiring = wiring
        self._namespace = runtime.namespace(wiring.namespace)
        self._component = self._namespace.component(wiring.component)
        self._generate: Any = None
        self._snapshots: Any = None
        self._outbox: asyncio.Queue[RoutingSyncMessage] = asyncio.Queue()
        self._peers: set[str] = set()  # other router replicas of the same workers
        self._replica_key = ""
        self._runtime = runtime
        self._subscriptions: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.router = KvRouter(config, self._fetch_snapshot,
                               registry=runtime.metrics_registry, name=name,
                               publish_sync=self._queue_sync)
        self.observer = RouterObserver(config.block_size)

    @classmethod
    async def start(
        cls,
        runtime: DistributedRuntime,
        config: KvRouterConfig,
        wiring: RouterWiring | None = None,
        *,
        name: str | None = None,
    ) -> KvRoutedClient:
        """Start following the workers; `name` labels the metrics (default: endpoint path)."""
        wiring = wiring or RouterWiring()
        path = f"{wiring.namespace}.{wiring.component}.{wiring.generate_endpoint}"
        self = cls(runtime, config, wiring, name or path)
        w = self.wiring
        self._generate = await self._component.endpoint(w.generate_endpoint).client(EngineOutput)
        self._snapshots = await self._component.endpoint(w.snapshot_endpoint).client(CacheSnapshot)
        self._generate.on_change.append(self._follow_workers)
        self._follow_workers()
        self._feed(w.kv_events_subject, self._on_kv_payload)
        self._feed(w.load_metrics_subject, self._on_load_payload)
        self._feed(w.sync_subject, self._on_sync_payload)
        self._tasks.append(asyncio.ensure_future(self._publish_sync()))
        await self._join_replicas(runtime)
        return self

    # --- replicas ------------------------------------------------------------------
    def _replicas_prefix(self) -> str:
        w = self.wiring
        return f"{ROUTER_REPLICAS_PREFIX}{w.namespace}/{w.component}/{w.generate_endpoint}/"

    async def _join_replicas(self, runtime: DistributedRuntime) -> None:
        """Announce this replica (leased) and follow the others: sync only when there are any."""
        prefix = self._replicas_prefix()
        self._replica_key = prefix + self.router.replica_id
        await runtime.discovery.put(self._replica_key, b"", lease=True)
        watch = runtime.discovery.watch_prefix(prefix)
        self._tasks.append(asyncio.ensure_future(self._follow_replicas(watch, prefix)))

    async def _follow_replicas(self, watch: Any, prefix: str) -> None:
        async for event in watch:
            replica = event.key[len(prefix):]
            if replica == self.router.replica_id:
                continue
            if event.kind == PUT:
                self._peers.add(replica)
            else:
                self._peers.discard(replica)
                self.router.on_replica_removed(replica)

    # --- requests ------------------------------------------------------------------
    async def generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        """Route `request`, then stream the chosen worker's outputs; books load meanwhile."""
        decision = await self.schedule(request)
        async for out in self.stream(request, decision.worker_id, context):
            yield out

    async def stream(
        self, request: PreprocessedRequest, worker_id: int, context: Context,
        watch: Callable[[Any], None] | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Stream from a scheduled worker; the router books the load until the stream ends.

        `watch` is handed the request-plane stream first (stall detection watches it)."""
        request_id = request.request_id
        waiting_first = True
        responses = self._generate.direct(request, worker_id, context)
        if watch is not None:
            watch(responses)
        tokens = 0
        try:
            async for out in responses:
                tokens += len(out.token_ids)
                if waiting_first and (out.token_ids or out.finish_reason):
                    self.router.on_first_token(request_id)
                    waiting_first = False
                yield out
        finally:
            self.router.on_finished(request_id)
            self.observer.on_stream_end(worker_id, tokens)

    def instance_ids(self) -> list[int]:
        return self._generate.instance_ids()

    async def ping(self, worker_id: int, timeout: float) -> PingResult:
        """Whether the worker answers a request-plane ping within `timeout` (the canary)."""
        return await self._generate.ping(worker_id, timeout)

    async def schedule(
        self, request: PreprocessedRequest, worker_ids: Candidates | None = None
    ) -> RoutingDecision:
        """Pick a worker among `worker_ids` (default: every live one, asked again while the
        request waits for a non-busy worker) and book the request."""
        hints = request.routing
        lora = hints.lora_name if hints else None
        hashes = hints.block_hashes if hints else None
        if hashes is None:
            hashes = sequence_hashes(request.token_ids, self.router.config.block_size,
                                     lora_name=lora, salt=request.cache_salt)
        decision = await self.router.schedule(
            request.token_ids, request.request_id, lora_name=lora,
            worker_ids=self._generate.instance_ids if worker_ids is None else worker_ids,
            pinned_worker=hints.worker_id if hints else None, block_hashes=hashes,
            cache_salt=request.cache_salt, session_id=hints.session_id if hints else None,
        )
        self.observer.on_decision(request.request_id, request.token_ids, hashes, decision)
        return decision

    def explain(self, request: PreprocessedRequest) -> RoutingDecision:
        """Where `request` would go now, and why; changes nothing."""
        hints = request.routing
        return self.router.explain(request.token_ids,
                                   lora_name=hints.lora_name if hints else None,
                                   worker_ids=self._generate.instance_ids(),
                                   pinned_worker=hints.worker_id if hints else None,
                                   cache_salt=request.cache_salt,
                                   session_id=hints.session_id if hints else None)

    def live_instance_ids(self) -> list[int]:
        """Workers in discovery, less those whose connection just failed (a dead worker whose
        lease has not expired yet does not count as live, so /health and 503s follow it)."""
        return self._generate.live_instance_ids()

    def live_workers(self) -> int:
        return len(self.live_instance_ids())

    def view(self) -> RouterView:
        """A snapshot for the fleet page: workers, last decisions, hottest shared prefixes."""
        router, observer = self.router, self.observer
        workers = [self._worker_view(w) for w in sorted(self._generate.instance_ids())]
        return RouterView(router.config.policy, router.config.block_size, workers,
                          list(observer.decisions), observer.hot_prefixes(router.index))

    def _worker_view(self, worker: int) -> WorkerView:
        load = self.router.active_load
        m = load.published(worker)
        tokens = self.observer.tokens.get(worker, 0)
        held = self.router.index.num_worker_blocks(worker)
        active = load.load(worker).active_requests
        if m is None:
            return WorkerView(worker, 0, 0, 0, 0, held, 0, 0, active, tokens)
        return WorkerView(worker, m.active_blocks, m.total_blocks, m.host_active_blocks,
                          m.host_total_blocks, held, m.num_running, m.num_waiting, active, tokens)

    # --- discovery -----------------------------------------------------------------
    def _follow_workers(self) -> None:
        live = set(self._generate.instances)
        known = set(self.router.stats().workers)
        for worker in live - known:
            self.router.on_worker_added(worker)
        for worker in known - live:
            self.router.on_worker_removed(worker)
            self.observer.on_worker_removed(worker)

    async def _fetch_snapshot(self, worker_id: int) -> CacheSnapshot:
        stream = self._snapshots.direct(SnapshotRequest(worker_id), worker_id)

        async def first() -> CacheSnapshot:
            async for snapshot in stream:
                return snapshot
            raise SnapshotUnavailableError(
                f"worker {worker_id:x} answered no KV cache snapshot on "
                f"{self.wiring.component}.{self.wiring.snapshot_endpoint}; check that the "
                "worker serves that endpoint")

        return await asyncio.wait_for(first(), self.wiring.snapshot_timeout_s)

    # --- event feeds ---------------------------------------------------------------
    def _feed(self, subject: str, handle: Any) -> None:
        subscription = self._namespace.events.subscribe(subject)
        self._subscriptions.append(subscription)
        self._tasks.append(asyncio.ensure_future(self._consume(subject, subscription, handle)))

    async def _consume(self, subject: str, subscription: Any, handle: Any) -> None:
        async for payload in subscription:
            try:
                handle(payload)
            except msgspec.DecodeError as exc:
                log.warning("router: dropping an undecodable message on %s: %s", subject, exc)

    _kv_decoder = msgspec.msgpack.Decoder(KvEventBatch)
    _load_decoder = msgspec.msgpack.Decoder(LoadMetrics)

    def _on_kv_payload(self, payload: bytes) -> None:
        batch = self._kv_decoder.decode(payload)
        if batch.worker_id in self._generate.instances:  # other models' workers share the plane
            self.router.on_kv_events(batch)

    def _on_load_payload(self, payload: bytes) -> None:
        metrics = self._load_decoder.decode(payload)
        if metrics.worker_id in self._generate.instances:
            self.router.on_load_metrics(metrics)

    def _on_sync_payload(self, payload: bytes) -> None:
        self.router.apply_sync(decode_sync(payload))

    def _queue_sync(self, message: RoutingSyncMessage) -> None:
        if self._peers:  # a lone replica has nobody to agree with
            self._outbox.put_nowait(message)

    async def _publish_sync(self) -> None:
        while True:
            message = await self._outbox.get()
            try:
                await self._namespace.events.publish(self.wiring.sync_subject, encode_sync(message))
            except Exception as exc:  # the event plane closing at shutdown, or a lost broker
                log.debug("router: replica sync message not sent: %s", exc)

    async def close(self) -> None:
        if self._replica_key:
            with contextlib.suppress(Exception):
                await self._runtime.discovery.delete(self._replica_key)
        for subscription in self._subscriptions:
            subscription.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.router.close()
        for client in (self._generate, self._snapshots):
            if client is not None:
                await client.close()


async def serve_router(
    runtime: DistributedRuntime,
    config: KvRouterConfig,
    wiring: RouterWiring | None = None,
    *,
    component: str = "router",
) -> None:
    """Run the router as its own service until the runtime shuts down.

    Serves `<namespace>.<component>.generate` (route, then stream from the chosen
    worker: callers use it like a worker) and `<component>.explain` (one JSON document,
    the `RoutingDecision` the router would make now). Replicas share load via sync.
    """
    wiring = wiring or RouterWiring()
    client = await KvRoutedClient.start(runtime, config, wiring)
    served = runtime.namespace(wiring.namespace).component(component)

    async def explain(request: PreprocessedRequest, context: Context) -> AsyncIterator[bytes]:
        yield client.explain(request).as_json()

    try:
        await asyncio.gather(
            served.endpoint("generate").serve(client.generate, request_type=PreprocessedRequest),
            served.endpoint("explain").serve(explain, request_type=PreprocessedRequest),
        )
    finally:
        await client.close()
