"""KvRouter end to end over real KV events, load, policies, explain and metrics."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from kvflow.llm.kv_events import (
    BlocksStored,
    CachedBlock,
    CacheSnapshot,
    KvEvent,
    KvEventBatch,
    LoadMetrics,
    StoredBlock,
)
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.router import KvRouter, KvRouterConfig, NoWorkersError, UnknownWorkerError

BLOCK = 4
PROMPT = list(range(1, 33))  # 8 blocks


class Worker:
    """Emits KV events the way an engine would (consecutive ids) and serves snapshots."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.next_id = 1
        self.blocks: list[int] = []

    def store(self, tokens: list[int], lora: str | None = None) -> KvEventBatch:
        hashes = sequence_hashes(tokens, BLOCK, lora_name=lora)
        new = [h for h in hashes if h not in self.blocks]
        self.blocks += new
        event = KvEvent(self.worker_id, self.next_id, BlocksStored([StoredBlock(h, []) for h in new]))
        self.next_id += 1
        return KvEventBatch(self.worker_id, [event])

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(self.worker_id, self.next_id - 1,
                             [CachedBlock(h, None) for h in self.blocks])


def make_router(workers: dict[int, Worker], **overrides: object) -> KvRouter:
    async def fetch(worker_id: int) -> CacheSnapshot:
        return workers[worker_id].snapshot()

    config = KvRouterConfig(block_size=BLOCK, seed=0, **overrides)  # type: ignore[arg-type]
    router = KvRouter(config, fetch, registry=CollectorRegistry())
    for w in workers:
        router.on_worker_added(w)
    return router


async def test_routes_to_the_worker_with_the_cached_prefix() -> None:
    workers = {1: Worker(1), 2: Worker(2), 3: Worker(3)}
    router = make_router(workers)
    router.on_kv_events(workers[2].store(PROMPT[:24]))  # 6 of 8 blocks
    router.on_kv_events(workers[3].store(PROMPT[:8]))
    decision = await router.schedule(PROMPT, "r1")
    assert decision.worker_id == 2
    assert decision.overlap_blocks == 6 and decision.request_blocks == 8
    assert decision.predicted_hit_rate == 0.75
    assert decision.overlaps == {1: 0, 2: 6, 3: 2}
    assert decision.costs == {1: 8.0, 2: 2.0, 3: 6.0}
    # Booked: 8 prompt tokens left to prefill, 8 decode blocks.
    load = router.active_load.load(2)
    assert (load.prefill_tokens, load.decode_blocks, load.active_requests) == (8, 8, 1)


async def test_load_spreads_identical_uncached_requests() -> None:
    router = make_router({1: Worker(1), 2: Worker(2)})
    picks = [(await router.schedule(PROMPT, f"r{i}")).worker_id for i in range(4)]
    assert sorted(picks) == [1, 1, 2, 2]


async def test_first_token_and_finish_release_load() -> None:
    router = make_router({1: Worker(1)})
    await router.schedule(PROMPT, "r1")
    router.on_first_token("r1")
    assert router.active_load.load(1).prefill_tokens == 0
    router.on_finished("r1")
    router.on_finished("r1")  # idempotent
    assert router.active_load.load(1).active_requests == 0


async def test_rescheduling_a_request_moves_its_load() -> None:
    router = make_router({1: Worker(1), 2: Worker(2)})
    first = await router.schedule(PROMPT, "r1")
    second = await router.schedule(PROMPT, "r1", worker_ids=[3 - first.worker_id])
    assert router.active_load.load(first.worker_id).active_requests == 0
    assert router.active_load.load(second.worker_id).active_requests == 1


async def test_lora_prompts_do_not_match_base_cache() -> None:
    workers = {1: Worker(1), 2: Worker(2)}
    router = make_router(workers)
    router.on_kv_events(workers[1].store(PROMPT))
    router.on_kv_events(workers[2].store(PROMPT, lora="sql"))
    assert router.explain(PROMPT).worker_id == 1
    assert router.explain(PROMPT, lora_name="sql").worker_id == 2


async def test_explain_changes_nothing() -> None:
    workers = {1: Worker(1), 2: Worker(2)}
    router = make_router(workers, temperature=1.0)
    router.on_kv_events(workers[1].store(PROMPT))
    explained = [router.explain(PROMPT) for _ in range(5)]
    assert len({d.worker_id for d in explained}) == 1  # same rng state every time
    assert router.active_load.request_ids() == []
    scheduled = await router.schedule(PROMPT, "r1")
    assert scheduled.worker_id == explained[0].worker_id
    doc = json.loads(explained[0].as_json())
    assert doc["worker_id"] == f"{explained[0].worker_id:x}" and doc["policy"] == "kv"
    assert doc["overlaps"] == {"1": 8, "2": 0}
    assert doc["loads"]["1"] == {"worker_id": "1", "prefill_tokens": 0, "decode_blocks": 0,
                                 "active_requests": 0, "total_blocks": None}


async def test_gap_in_events_recovers_through_snapshot() -> None:
    workers = {1: Worker(1), 2: Worker(2)}
    router = make_router(workers)
    workers[1].store(PROMPT)  # this batch is lost on the way
    router.on_kv_events(workers[1].store([99] * 8))
    await router.wait_recovered()
    assert router.explain(PROMPT).overlaps[1] == 8
    assert router.stats().recovery is not None and router.stats().recovery.recovered == 1


async def test_worker_removal_drops_blocks_and_late_events() -> None:
    workers = {1: Worker(1), 2: Worker(2)}
    router = make_router(workers)
    router.on_kv_events(workers[1].store(PROMPT))
    router.on_worker_removed(1)
    router.on_kv_events(workers[1].store(PROMPT[:4] + [7] * 4))  # straggler
    assert router.index.num_blocks() == 0
    assert (await router.schedule(PROMPT, "r1")).worker_id == 2
    with pytest.raises(UnknownWorkerError, match="worker 1"):
        await router.schedule(PROMPT, "r2", pinned_worker=1)


async def test_no_workers_error_says_what_to_do() -> None:
    router = make_router({})
    with pytest.raises(NoWorkersError, match="start a worker"):
        await router.schedule(PROMPT, "r1")


async def test_pinned_worker_wins_over_the_policy() -> None:
    workers = {1: Worker(1), 2: Worker(2)}
    router = make_router(workers)
    router.on_kv_events(workers[1].store(PROMPT))
    decision = await router.schedule(PROMPT, "r1", pinned_worker=2)
    assert decision.worker_id == 2 and decision.policy == "direct"
    assert decision.overlap_blocks == 0


async def test_published_metrics_steer_decisions() -> None:
    router = make_router({1: Worker(1), 2: Worker(2)})
    router.on_load_metrics(LoadMetrics(worker_id=1, active_blocks=500, total_blocks=1000,
                                       num_waiting=0, num_running=10))
    assert all([(await router.schedule(PROMPT, f"r{i}")).worker_id == 2 for i in range(3)])


async def test_approximate_mode_learns_from_its_own_decisions() -> None:
    router = KvRouter(KvRouterConfig(block_size=BLOCK, use_kv_events=False, seed=0),
                      registry=CollectorRegistry())
    for w in (1, 2, 3):
        router.on_worker_added(w)
    first = await router.schedule(PROMPT, "r1")
    router.on_first_token("r1")
    router.on_finished("r1")
    again = await router.schedule(PROMPT[:28] + [0] * 4, "r2")
    assert again.worker_id == first.worker_id and again.overlap_blocks == 7


def test_kv_events_mode_needs_fetch_snapshot() -> None:
    with pytest.raises(ValueError, match="fetch_snapshot"):
        KvRouter(KvRouterConfig())


async def test_metrics_are_recorded() -> None:
    registry = CollectorRegistry()
    workers = {1: Worker(1)}

    async def fetch(worker_id: int) -> CacheSnapshot:
        return workers[worker_id].snapshot()

    router = KvRouter(KvRouterConfig(block_size=BLOCK), fetch, registry=registry)
    router.on_worker_added(1)
    router.on_kv_events(workers[1].store(PROMPT))
    await router.schedule(PROMPT, "r1")
    label = {"router": "default"}

    def value(name: str, **extra: str) -> float | None:
        return registry.get_sample_value(name, {**label, **extra})

    assert value("kvflow_router_decisions_total", worker_id="1") == 1
    assert value("kvflow_router_matched_blocks_sum") == 8
    assert value("kvflow_router_predicted_hit_ratio_sum") == 1.0
    assert value("kvflow_router_decision_seconds_count") == 1
    assert value("kvflow_router_index_blocks") == 8
    assert value("kvflow_router_waiting_requests") == 0
    # A second router (another model) reports into the same registry under its own name.
    other = KvRouter(KvRouterConfig(block_size=BLOCK), fetch, registry=registry, name="m2")
    other.on_worker_added(1)
    await other.schedule(PROMPT, "r1")
    assert registry.get_sample_value("kvflow_router_decisions_total",
                                     {"router": "m2", "worker_id": "1"}) == 1
    assert value("kvflow_router_decisions_total", worker_id="1") == 1
