"""The router sees lower KV tiers: per-tier residency from `medium` events, credit by speed."""

from __future__ import annotations

import msgspec
from prometheus_client import CollectorRegistry

from kvflow.llm.kv_events import (
    BlocksRemoved,
    BlocksStored,
    CacheSnapshot,
    KvEvent,
    KvEventBatch,
    LoadMetrics,
    StoredBlock,
)
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.router import KvRouter, KvRouterConfig

BLOCK = 4
PROMPT = list(range(1, 33))  # 8 blocks
HASHES = sequence_hashes(PROMPT, BLOCK)


def event(worker: int, event_id: int, hashes: list[int], medium: str | None) -> KvEventBatch:
    data = BlocksStored([StoredBlock(h, []) for h in hashes], medium=medium)
    return KvEventBatch(worker, [KvEvent(worker, event_id, data)])


def make_router(*workers: int) -> KvRouter:
    async def fetch(worker_id: int) -> CacheSnapshot:
        return CacheSnapshot(worker_id, 0, [])

    router = KvRouter(KvRouterConfig(block_size=BLOCK, seed=0), fetch, registry=CollectorRegistry())
    for w in workers:
        router.on_worker_added(w)
    return router


def costs(worker: int, **tier_block_s: float) -> LoadMetrics:
    return LoadMetrics(worker, 0, 100, 0, 0, tier_block_s=tier_block_s)


def test_old_workers_events_decode_and_medium_defaults_to_device() -> None:
    class OldStored(msgspec.Struct, tag="stored"):
        blocks: list[StoredBlock]
        parent_hash: int | None = None

    wire = msgspec.msgpack.encode(OldStored([StoredBlock(1, [])]))
    decoded = msgspec.msgpack.decode(wire, type=BlocksStored | BlocksRemoved)
    assert isinstance(decoded, BlocksStored) and decoded.medium is None


async def test_host_blocks_extend_a_workers_overlap_by_their_worth() -> None:
    router = make_router(1, 2)
    router.on_kv_events(event(1, 1, HASHES[:2], None))  # device: 2 blocks
    router.on_kv_events(event(1, 2, HASHES[2:6], "host"))  # then 4 in host memory
    router.on_load_metrics(costs(1, host=0.25e-3, recompute=1e-3))  # host load = 1/4 of recompute
    decision = await router.schedule(PROMPT, "r1")
    assert decision.worker_id == 1
    assert decision.overlaps[1] == 2 + 4 * 0.75
    router.on_load_metrics(costs(1, host=2e-3, recompute=1e-3))  # loading slower: worth nothing
    assert router.explain(PROMPT).overlaps[1] == 2


async def test_object_store_blocks_count_for_every_worker() -> None:
    router = make_router(1, 2, 3)
    router.on_kv_events(event(1, 1, HASHES, "object"))  # worker 1 uploaded the whole prompt
    router.on_kv_events(event(2, 1, HASHES[:3], None))  # worker 2 has 3 blocks on its device
    for w in (1, 2, 3):
        router.on_load_metrics(costs(w, object=0.5e-3, recompute=1e-3))
    explained = router.explain(PROMPT)
    assert explained.overlaps[3] == 8 * 0.5
    assert explained.overlaps[2] == 3 + 5 * 0.5
    router.on_kv_events(KvEventBatch(1, [KvEvent(1, 2, BlocksRemoved(HASHES[4:], medium="object"))]))
    assert router.explain(PROMPT).overlaps[3] == 4 * 0.5
    router.on_worker_removed(1)  # shared blocks stay: they live in the store, not the worker
    assert router.explain(PROMPT).overlaps[3] == 4 * 0.5


async def test_a_run_whose_latency_outweighs_recompute_earns_nothing() -> None:
    router = make_router(1)
    router.on_kv_events(event(1, 1, HASHES, "object"))
    slow_start = {"object": 0.5e-3, "object_latency": 5e-3, "recompute": 1e-3}  # 9 ms vs 8 ms
    router.on_load_metrics(costs(1, **slow_start))
    assert router.explain(PROMPT).overlaps.get(1, 0) == 0
    router.on_load_metrics(costs(1, **{**slow_start, "object_latency": 1e-3}))  # 5 ms vs 8 ms
    assert router.explain(PROMPT).overlaps[1] == 8 * 0.5


async def test_a_host_load_overlaps_the_prefill_already_queued_on_its_worker() -> None:
    router = make_router(1, 2)
    router.on_kv_events(event(1, 1, HASHES[:2], None))  # device: 2 blocks
    router.on_kv_events(event(1, 2, HASHES[2:6], "host"))  # then 4 in host memory
    tiers = {"host": 0.25e-3, "recompute": 1e-3}  # loading 4 blocks takes 1 block of prefill time
    idle = LoadMetrics(1, 0, 100, 0, 0, tier_block_s=tiers)
    router.on_load_metrics(idle)
    assert router.explain(PROMPT).overlaps[1] == 2 + 4 * 0.75  # idle: the load is all delay
    router.on_load_metrics(LoadMetrics(1, 0, 100, 1, 0, prefill_tokens_inflight=2, tier_block_s=tiers))
    assert router.explain(PROMPT).overlaps[1] == 2 + 4 - 0.5  # half a block of it hides in the queue
    router.on_load_metrics(LoadMetrics(1, 0, 100, 1, 0, prefill_tokens_inflight=8, tier_block_s=tiers))
    assert router.explain(PROMPT).overlaps[1] == 6  # the load finishes before the queue does


async def test_a_block_counts_in_the_fastest_tier_holding_it_and_a_worthless_tier_ends_the_run() -> None:
    router = make_router(1)
    router.on_kv_events(event(1, 1, HASHES[:5], "disk"))
    router.on_kv_events(event(1, 2, HASHES[:2], "host"))  # the first two are in both
    router.on_load_metrics(costs(1, host=0.25e-3, disk=0.5e-3, recompute=1e-3))
    assert router.explain(PROMPT).overlaps[1] == 2 * 0.75 + 3 * 0.5
    router.on_load_metrics(costs(1, host=0.25e-3, disk=2e-3, recompute=1e-3))  # disk: slower
    assert router.explain(PROMPT).overlaps[1] == 2 * 0.75
    router.on_kv_events(KvEventBatch(1, [KvEvent(1, 3, BlocksRemoved(HASHES[:1], medium="host"))]))
    assert router.explain(PROMPT).overlaps.get(1, 0) == 0  # block 0 only on disk: nothing reachable
