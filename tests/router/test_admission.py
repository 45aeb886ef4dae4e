"""Busy thresholds: requests wait FCFS while every worker is busy; a full queue refuses."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from kvflow.llm.kv_events import CacheSnapshot, LoadMetrics
from kvflow.router import KvRouter, KvRouterConfig, RouterOverloadedError
from kvflow.router.admission import AdmissionQueue

PROMPT = list(range(16))


async def no_snapshot(worker_id: int) -> CacheSnapshot:
    raise AssertionError("these tests send no KV events")


def make_router(**overrides: object) -> tuple[KvRouter, CollectorRegistry]:
    registry = CollectorRegistry()
    config = KvRouterConfig(block_size=4, seed=0, **overrides)  # type: ignore[arg-type]
    router = KvRouter(config, no_snapshot, registry=registry)
    for w in (1, 2):
        router.on_worker_added(w)
    return router, registry


async def test_requests_wait_then_are_admitted_fcfs_as_load_frees() -> None:
    router, _ = make_router(max_active_requests=1, max_queue=4)
    d1 = await router.schedule(PROMPT, "a")
    d2 = await router.schedule(PROMPT, "b")
    assert {d1.worker_id, d2.worker_id} == {1, 2}
    order: list[str] = []

    async def later(rid: str) -> int:
        decision = await router.schedule(PROMPT, rid)
        order.append(rid)
        return decision.worker_id

    waiting = [asyncio.create_task(later(rid)) for rid in ("c", "d", "e")]
    await asyncio.sleep(0.01)
    assert router.stats().admission.waiting == 3 and order == []
    router.on_finished("a")
    await asyncio.sleep(0.01)
    assert order == ["c"]  # one slot freed: only the head gets in
    router.on_finished("b")
    router.on_finished("c")
    await asyncio.sleep(0.01)
    assert order == ["c", "d", "e"]
    assert await waiting[1] != await waiting[2]


async def test_full_queue_raises_overloaded_with_retry_after() -> None:
    router, registry = make_router(max_active_requests=1, max_queue=1, retry_after_s=2.5)
    await router.schedule(PROMPT, "a")
    await router.schedule(PROMPT, "b")
    parked = asyncio.create_task(router.schedule(PROMPT, "c"))
    await asyncio.sleep(0.01)
    with pytest.raises(RouterOverloadedError, match="busy") as err:
        await router.schedule(PROMPT, "d")
    assert err.value.retry_after_s == 2.5
    assert registry.get_sample_value("kvflow_router_rejected_requests_total", {"router": "default"}) == 1
    assert registry.get_sample_value("kvflow_router_waiting_requests", {"router": "default"}) == 1
    router.on_finished("a")
    await parked


async def test_wait_times_out() -> None:
    router, _ = make_router(max_active_requests=1, queue_timeout_s=0.05)
    await router.schedule(PROMPT, "a")
    await router.schedule(PROMPT, "b")
    with pytest.raises(RouterOverloadedError, match="stayed busy"):
        await router.schedule(PROMPT, "c")
    assert router.stats().admission.waiting == 0


async def test_decode_fraction_threshold_from_published_metrics() -> None:
    router, _ = make_router(max_decode_fraction=0.9)
    for w in (1, 2):
        router.on_load_metrics(LoadMetrics(worker_id=w, active_blocks=95, total_blocks=100,
                                           num_waiting=0, num_running=5))
    parked = asyncio.create_task(router.schedule(PROMPT, "a"))
    await asyncio.sleep(0.01)
    assert not parked.done()
    router.on_load_metrics(LoadMetrics(worker_id=2, active_blocks=10, total_blocks=100,
                                       num_waiting=0, num_running=1))
    assert (await parked).worker_id == 2


async def test_busy_workers_are_skipped_while_one_has_room() -> None:
    router, _ = make_router(max_decode_fraction=0.5)
    router.on_load_metrics(LoadMetrics(worker_id=1, active_blocks=60, total_blocks=100,
                                       num_waiting=0, num_running=3))
    decisions = [await router.schedule(PROMPT, f"r{i}") for i in range(3)]
    assert [d.worker_id for d in decisions] == [2, 2, 2]


async def test_cancelled_waiter_leaves_the_queue() -> None:
    router, _ = make_router(max_active_requests=1)
    await router.schedule(PROMPT, "a")
    await router.schedule(PROMPT, "b")
    first = asyncio.create_task(router.schedule(PROMPT, "c"))
    second = asyncio.create_task(router.schedule(PROMPT, "d"))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    router.on_finished("a")
    assert (await second).worker_id in (1, 2)
    assert first.cancelled()


async def test_hand_over_released_when_woken_waiter_is_cancelled() -> None:
    queue = AdmissionQueue(max_waiting=4, timeout_s=5.0, retry_after_s=1.0)
    room = [False]
    waiter = asyncio.create_task(queue.admit(lambda: room[0]))
    await asyncio.sleep(0)
    room[0] = True
    queue.pump()  # wakes the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.can_admit_now(lambda: True)  # its turn was handed back


async def test_waiting_request_skips_workers_that_left() -> None:
    router, _ = make_router(max_active_requests=1)
    await router.schedule(PROMPT, "a")
    await router.schedule(PROMPT, "b")
    parked = asyncio.create_task(router.schedule(PROMPT, "c"))
    await asyncio.sleep(0.01)
    remaining = router.active_load.worker_of("b")
    router.on_worker_removed(router.active_load.worker_of("a") or 0)
    await asyncio.sleep(0.01)
    assert not parked.done()  # the departed worker's freed slot is no room at all
    router.on_finished("b")
    decision = await parked
    assert decision.worker_id == remaining and set(decision.loads) == {remaining}
