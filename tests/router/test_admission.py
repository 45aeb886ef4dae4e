"""Busy thresholds: requests wait FCFS while every worker is busy; a full queue refuses."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from prometheus_client import CollectorRegistry

from kvflow.llm.kv_events import CacheSnapshot, LoadMetrics
from kvflow.router import KvRouter, KvRouterConfig, RouterOverloadedError
from kvflow.router.admission import AdmissionQueue, AdmissionStats, HoldQueue, Waiter
from kvflow.router.config import add_router_args, config_from_args

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


# --- the hold rule itself (HoldQueue, no event loop), and the prefill-token threshold ---

class _Slots:
    """A hand-counted fleet: `free` slots; an admitted waiter takes one and routes at once."""

    def __init__(self, hold: HoldQueue) -> None:
        self.hold, self.free, self.routed, self.rejected = hold, 0, [], []

    def room(self) -> bool:
        return self.free > 0

    def waiter(self, name: str) -> Waiter:
        def admit() -> None:
            self.free -= 1
            self.routed.append(name)
            self.hold.done()
        return Waiter(self.room, admit, lambda err: self.rejected.append((name, str(err))))


def test_hold_releases_in_arrival_order_only_as_far_as_room_goes() -> None:
    hold = HoldQueue(max_waiting=8, timeout_s=5.0, retry_after_s=1.0)
    slots = _Slots(hold)
    assert not hold.try_admit(slots.room)  # no room: the caller must hold it
    waiters = {n: slots.waiter(n) for n in "abc"}
    for w in waiters.values():
        hold.hold(w)
    assert hold.waiting() == 3 and slots.routed == []
    slots.free = 2
    hold.pump()
    assert slots.routed == ["a", "b"] and hold.waiting() == 1  # c: no third slot
    slots.free = 1
    hold.pump()
    assert slots.routed == ["a", "b", "c"] and hold.stats().admitted_after_wait == 3
    hold.time_out(waiters["a"])  # a timer firing after its turn came does nothing
    assert slots.rejected == [] and hold.stats().timed_out == 0


def test_a_newcomer_does_not_jump_the_hold() -> None:
    hold = HoldQueue(max_waiting=8, timeout_s=5.0, retry_after_s=1.0)
    slots = _Slots(hold)
    hold.hold(slots.waiter("a"))
    slots.free = 1
    assert not hold.try_admit(slots.room)  # room exists, but a waits first
    hold.hold(slots.waiter("b"))  # holding pumps: a takes the slot
    assert slots.routed == ["a"] and hold.waiting() == 1


def test_hold_full_refuses_and_a_long_wait_times_out_with_a_clear_error() -> None:
    hold = HoldQueue(max_waiting=1, timeout_s=2.5, retry_after_s=1.5)
    slots = _Slots(hold)
    a = slots.waiter("a")
    hold.hold(a)
    with pytest.raises(RouterOverloadedError, match="1 requests already wait") as err:
        hold.hold(slots.waiter("b"))
    assert err.value.retry_after_s == 1.5
    hold.time_out(a)
    assert slots.rejected == [("a", "all workers stayed busy for 2.5 s while this request waited; "
                                     "retry after 1.5 s or add workers")]
    assert hold.stats() == AdmissionStats(waiting=0, admitted_after_wait=0, rejected=1, timed_out=1)


def test_an_abandoned_waiter_is_dropped_and_the_next_gets_its_turn() -> None:
    hold = HoldQueue(max_waiting=8, timeout_s=5.0, retry_after_s=1.0)
    slots = _Slots(hold)
    a, b = slots.waiter("a"), slots.waiter("b")
    hold.hold(a)
    hold.hold(b)
    hold.abandon(a)  # its client disconnected while it waited
    slots.free = 1
    hold.pump()
    assert slots.routed == ["b"] and hold.waiting() == 0


def _prompt(i: int, n: int = 32) -> list[int]:
    return list(range(1000 * i, 1000 * i + n))


async def test_prefill_token_threshold_holds_until_a_first_token_frees_a_worker() -> None:
    # 32-token prompts, threshold 32: one routed prompt makes its worker busy.
    router, _ = make_router(max_prefill_tokens=32)
    a = await router.schedule(_prompt(1), "a")
    b = await router.schedule(_prompt(2), "b")
    assert {a.worker_id, b.worker_id} == {1, 2}
    parked = asyncio.create_task(router.schedule(_prompt(3), "c"))
    await asyncio.sleep(0.01)
    assert not parked.done() and router.stats().admission.waiting == 1
    router.on_first_token("a")  # a's prefill is done: its worker has 0 queued prefill tokens
    assert (await parked).worker_id == a.worker_id


async def test_a_worker_that_joins_takes_the_held_request() -> None:
    router = KvRouter(KvRouterConfig(block_size=4, seed=0, max_active_requests=1), no_snapshot)
    router.on_worker_added(1)
    assert (await router.schedule(PROMPT, "a")).worker_id == 1
    parked = asyncio.create_task(router.schedule(PROMPT, "b"))
    await asyncio.sleep(0.01)
    assert not parked.done()
    router.on_worker_added(2)
    assert (await parked).worker_id == 2


def test_prefill_token_threshold_is_checked_and_has_a_flag() -> None:
    with pytest.raises(ValueError, match="max_prefill_tokens=0 is invalid"):
        KvRouterConfig(max_prefill_tokens=0)
    parser = argparse.ArgumentParser()
    add_router_args(parser)
    config = config_from_args(parser.parse_args(["--router-max-prefill-tokens", "4096"]))
    assert config.max_prefill_tokens == 4096 and config.has_busy_threshold
    assert config_from_args(parser.parse_args([])).max_prefill_tokens is None  # off by default


async def test_candidates_given_as_a_function_are_asked_again_while_the_request_waits() -> None:
    # The frontend passes its usable workers this way: a worker it learns of later counts.
    router, _ = make_router(max_active_requests=1)
    usable = [1]
    asked = []

    def candidates() -> list[int]:
        asked.append(1)
        return usable

    assert (await router.schedule(PROMPT, "a", worker_ids=candidates)).worker_id == 1
    assert len(asked) == 1  # admitted at once: the candidates are asked for once, not per check
    parked = asyncio.create_task(router.schedule(PROMPT, "b", worker_ids=lambda: usable))
    await asyncio.sleep(0.01)
    assert not parked.done()  # worker 2 is idle, but not a candidate
    usable.append(2)
    router.on_load_metrics(LoadMetrics(worker_id=2, active_blocks=0, total_blocks=100,
                                       num_waiting=0, num_running=0))  # any load change pumps
    assert (await parked).worker_id == 2
