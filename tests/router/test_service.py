"""KvRoutedClient over a real runtime (memory discovery, in-process events, TCP request
plane) with real mocker engines as workers publishing real KV events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import pytest

from kvflow.engines.base import EngineHooks
from kvflow.engines.mocker.config import MockerConfig
from kvflow.engines.mocker.engine import MockerEngine
from kvflow.llm.kv_events import (
    KV_EVENTS_SUBJECT,
    LOAD_METRICS_SUBJECT,
    KvEvent,
    KvEventBatch,
    LoadMetrics,
)
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest, RoutingHints, StopConditions
from kvflow.router import KvRouterConfig
from kvflow.router.service import KvRoutedClient, RouterWiring, serve_router
from kvflow.runtime import Context, DistributedRuntime, RuntimeConfig

BLOCK = 4
WIRING = RouterWiring(namespace="routertest")


@dataclass
class Fleet:
    runtime: DistributedRuntime
    engines: dict[int, MockerEngine]
    drop_events: set[int]


async def start_worker(fleet: Fleet, worker_id: int, tasks: list[asyncio.Future]) -> None:
    """What a worker process does: run an engine, publish its events, serve two endpoints."""
    ns = fleet.runtime.namespace(WIRING.namespace)

    def publish_events(events: list[KvEvent]) -> None:
        if events and worker_id not in fleet.drop_events:
            payload = msgspec.msgpack.encode(KvEventBatch(worker_id, events))
            asyncio.ensure_future(ns.events.publish(KV_EVENTS_SUBJECT, payload))

    def publish_load(metrics: LoadMetrics) -> None:
        asyncio.ensure_future(ns.events.publish(LOAD_METRICS_SUBJECT,
                                                msgspec.msgpack.encode(metrics)))

    config = MockerConfig(num_gpu_blocks=256, block_size=BLOCK, speedup_ratio=0)
    engine = MockerEngine(config, EngineHooks(worker_id, publish_events, publish_load))
    await engine.start()
    fleet.engines[worker_id] = engine

    async def snapshot(request: object, context: Context) -> AsyncIterator[object]:
        yield engine.cache_snapshot()

    component = ns.component(WIRING.component)
    tasks.append(asyncio.ensure_future(component.endpoint(WIRING.generate_endpoint).serve(
        engine.generate, instance_id=worker_id, request_type=PreprocessedRequest)))
    tasks.append(asyncio.ensure_future(component.endpoint(WIRING.snapshot_endpoint).serve(
        snapshot, instance_id=worker_id)))


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    runtime = await DistributedRuntime(RuntimeConfig(
        namespace=WIRING.namespace, discovery="memory", event_plane="inproc")).start()
    fleet = Fleet(runtime, {}, set())
    tasks: list[asyncio.Future] = []
    for worker_id in (101, 202):
        await start_worker(fleet, worker_id, tasks)
    yield fleet
    await runtime.shutdown()
    for engine in fleet.engines.values():
        await engine.stop()
    for task in tasks:
        with contextlib.suppress(Exception):
            await task


def request(request_id: str, tokens: list[int], worker: int | None = None) -> PreprocessedRequest:
    routing = RoutingHints(worker_id=worker) if worker is not None else None
    return PreprocessedRequest(request_id, tokens, stop=StopConditions(max_tokens=3),
                               routing=routing)


async def run(client: KvRoutedClient, req: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in client.generate(req, Context(req.request_id))]


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_requests_follow_the_cache_across_the_runtime(fleet: Fleet) -> None:
    client = await KvRoutedClient.start(fleet.runtime, KvRouterConfig(block_size=BLOCK, seed=0),
                                        WIRING)
    try:
        await eventually(lambda: client.live_workers() == 2)
        prompt = list(range(1, 65))  # 16 blocks
        first = await run(client, request("a", prompt))
        assert first[-1].finish_reason is not None
        await eventually(lambda: max(client.explain(request("x", prompt)).overlaps.values()) == 16)
        cached_on = client.explain(request("x", prompt)).worker_id
        # Same system prompt, new question: goes where the prefix is cached, and hits it.
        follow = await run(client, request("b", [*prompt[:48], 900, 901, 902, 903]))
        assert client.router.stats().active_requests == 0
        assert max(o.cached_tokens or 0 for o in follow) == 48
        assert fleet.engines[cached_on].pool.num_cached_blocks >= 16
        other = 303 - cached_on
        pinned = await run(client, request("c", prompt, worker=other))
        assert max(o.cached_tokens or 0 for o in pinned) == 0
    finally:
        await client.close()


async def test_lost_events_are_recovered_from_the_worker_snapshot(fleet: Fleet) -> None:
    # No pending blocks: the overlap seen below must come from the recovered exact index.
    config = KvRouterConfig(block_size=BLOCK, seed=0, pending_ttl_s=0)
    client = await KvRoutedClient.start(fleet.runtime, config, WIRING)
    try:
        await eventually(lambda: client.live_workers() == 2)
        fleet.drop_events.add(101)  # worker 101's next batches never reach the router
        await run(client, request("a", list(range(1, 41)), worker=101))
        fleet.drop_events.clear()
        await run(client, request("b", list(range(500, 520)), worker=101))
        await eventually(lambda: client.explain(request("x", list(range(1, 41)))).overlaps[101]
                         == 10)
        assert client.router.stats().recovery.recovered >= 1  # type: ignore[union-attr]
    finally:
        await client.close()


async def test_replicas_share_load_over_the_event_plane(fleet: Fleet) -> None:
    config = KvRouterConfig(block_size=BLOCK, seed=0)
    a = await KvRoutedClient.start(fleet.runtime, config, WIRING, name="replica-a")
    b = await KvRoutedClient.start(fleet.runtime, config, WIRING, name="replica-b")
    try:
        await eventually(lambda: a.live_workers() == 2 and b.live_workers() == 2)
        decision = await a.schedule(request("a", list(range(1, 41))))
        await eventually(lambda: b.router.active_load.load(decision.worker_id).active_requests
                         == 1)
        # b now sees the booked load and sends an identical request to the other worker.
        assert (await b.schedule(request("b", list(range(1, 41))))).worker_id != (
            decision.worker_id)
        a.router.on_finished("a")
        await eventually(lambda: b.router.active_load.load(decision.worker_id).active_requests
                         == 0)
    finally:
        await a.close()
        await b.close()


async def test_replicas_share_sessions_over_the_event_plane(fleet: Fleet) -> None:
    config = KvRouterConfig(block_size=BLOCK, seed=0)
    a = await KvRoutedClient.start(fleet.runtime, config, WIRING, name="session-a")
    b = await KvRoutedClient.start(fleet.runtime, config, WIRING, name="session-b")
    try:
        await eventually(lambda: a.live_workers() == 2 and b.live_workers() == 2)
        await eventually(lambda: bool(a._peers and b._peers))
        turn1 = list(range(1, 41))
        hints = RoutingHints(session_id="conv-1")
        first = await a.schedule(PreprocessedRequest("t1", turn1, routing=hints))
        a.router.on_finished("t1")
        turn2 = PreprocessedRequest("t2", [*turn1, 77, 78, 79, 80], routing=hints)
        # Only replica a routed turn 1; b learns the session from a's sync message.
        await eventually(lambda: b.explain(turn2).session_worker == first.worker_id)
        decision = await b.schedule(turn2)
        assert decision.worker_id == first.worker_id and decision.session_blocks == 10
    finally:
        await a.close()
        await b.close()


async def test_standalone_router_service(fleet: Fleet) -> None:
    config = KvRouterConfig(block_size=BLOCK, seed=0)
    service = asyncio.ensure_future(serve_router(fleet.runtime, config, WIRING))
    component = fleet.runtime.namespace(WIRING.namespace).component("router")
    generate = await component.endpoint("generate").client(EngineOutput)
    explain = await component.endpoint("explain").client()
    try:
        await generate.wait_for_instances(timeout=5)
        await explain.wait_for_instances(timeout=5)
        prompt = list(range(1, 41))
        outs = [o async for o in generate.round_robin(request("a", prompt), Context("a"))]
        assert outs[-1].finish_reason is not None and sum(len(o.token_ids) for o in outs) == 3

        async def overlap() -> int:
            docs = [d async for d in explain.round_robin(request("x", prompt))]
            return max(json.loads(docs[0])["overlaps"].values())

        deadline = asyncio.get_running_loop().time() + 5
        while await overlap() != 10:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
    finally:
        await generate.close()
        await explain.close()
        service.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await service


async def test_replicas_find_each_other_and_a_lone_one_sends_no_sync(fleet: Fleet) -> None:
    config = KvRouterConfig(block_size=BLOCK, seed=0)
    a = await KvRoutedClient.start(fleet.runtime, config, WIRING, name="lone-a")
    await a._generate.wait_for_instances(timeout=5, count=2)
    await a.schedule(PreprocessedRequest("lone-1", list(range(16))))
    assert a._outbox.empty()  # nobody to agree with
    b = await KvRoutedClient.start(fleet.runtime, config, WIRING, name="lone-b")
    for _ in range(100):
        if a._peers and b._peers:
            break
        await asyncio.sleep(0.01)
    assert a._peers == {b.router.replica_id} and b._peers == {a.router.replica_id}
    await b.close()
    for _ in range(100):
        if not a._peers:
            break
        await asyncio.sleep(0.01)
    assert not a._peers
    await a.close()
