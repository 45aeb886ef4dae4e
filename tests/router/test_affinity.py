"""Prefix-keeping policy math: cost terms, the spill rule, tie-breaks, pending blocks, sessions."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from kvflow.llm.kv_events import (
    AllCleared,
    BlocksRemoved,
    BlocksStored,
    CacheSnapshot,
    KvEvent,
    StoredBlock,
)
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.router import KvRouter, KvRouterConfig, RoutingSyncMessage, decode_sync, encode_sync
from kvflow.router.blocks import OverlapScores
from kvflow.router.cost import CostWeights, cost_terms, rendezvous, select_worker
from kvflow.router.load import WorkerLoad
from kvflow.router.pending import PendingBlocks
from kvflow.router.policies import RoutingSnapshot, build_router_policy
from kvflow.router.sessions import SessionAffinity

BS = 16
W = CostWeights(BS, prefill_load_scale=1.0, decode_load_scale=0.1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- cost terms and the spill rule ------------------------------------------------------
def test_cost_terms_hand_computed() -> None:
    # 160 tokens = 10 blocks, 6 cached: 4 to compute, 6 saved; 48 queued tokens = 3 blocks;
    # 20 decode blocks at 0.1 = 2. Total 3 + 4 + 2 = 9.
    t = cost_terms(160, 6, WorkerLoad(1, prefill_tokens=48, decode_blocks=20), W)
    assert (t.wait, t.prefill, t.saved, t.decode) == pytest.approx((3.0, 4.0, 6.0, 2.0))
    assert t.total == pytest.approx(9.0)


@pytest.mark.parametrize(("queued_blocks", "expected"), [(7, 1), (9, 2)])
def test_spill_only_when_the_wait_costs_more_than_the_recompute(queued_blocks: int,
                                                                 expected: int) -> None:
    # Worker 1 caches all 8 blocks but has prefill queued; worker 2 is idle and cold.
    # Staying costs the wait; spilling costs recomputing 8 blocks.
    policy = build_router_policy(KvRouterConfig(block_size=BS))
    loads = {1: WorkerLoad(1, prefill_tokens=queued_blocks * BS), 2: WorkerLoad(2)}
    snap = RoutingSnapshot(8 * BS + 1, loads, OverlapScores({1: 8}))
    assert policy.select(snap, random.Random(0)).worker_id == expected


def test_decode_load_does_not_swamp_a_long_cached_prefix() -> None:
    # The old cost counted a decode block like a prefill block: three 136-block requests
    # decoding on the prefix holder outweighed its 128 cached blocks (the multi-turn
    # traces in the issue note). Weighted at 0.1 they cost 41 blocks, less than 128.
    policy = build_router_policy(KvRouterConfig(block_size=BS))
    loads = {1: WorkerLoad(1, decode_blocks=3 * 136, active_requests=3), 2: WorkerLoad(2)}
    snap = RoutingSnapshot(136 * BS, loads, OverlapScores({1: 128}))
    choice = policy.select(snap, random.Random(0))
    assert choice.worker_id == 1
    terms = policy.terms(snap)  # type: ignore[attr-defined]
    assert terms[1].saved == 128 and terms[1].decode == pytest.approx(40.8)
    assert choice.costs == pytest.approx({w: t.total for w, t in terms.items()})


def test_ties_are_deterministic_and_spread_prefixes() -> None:
    costs = {w: 5.0 for w in range(4)}
    rng = random.Random(1)
    keys = [random.Random(7).getrandbits(64) + i * 7919 for i in range(400)]
    picks = [select_worker(costs, 0.0, rng, lambda w, k=k: rendezvous(k, w)) for k in keys]
    again = [select_worker(costs, 0.0, random.Random(99), lambda w, k=k: rendezvous(k, w))
             for k in keys]
    assert picks == again  # the rng plays no part
    counts = Counter(picks)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 60


def test_session_history_counts_as_cached_on_its_worker() -> None:
    loads = {1: WorkerLoad(1), 2: WorkerLoad(2)}
    snap = RoutingSnapshot(100, loads, OverlapScores({2: 1}), session_worker=1, session_blocks=4)
    assert snap.overlap_scores() == {2: 1, 1: 4}
    stale = RoutingSnapshot(100, loads, OverlapScores({1: 5}), session_worker=1, session_blocks=4)
    assert stale.overlap_scores() == {1: 5}  # the index knows more: it wins


# --- pending blocks ---------------------------------------------------------------------
def test_pending_blocks_extend_overlap_until_confirmed_refuted_or_expired() -> None:
    clock = Clock()
    pending = PendingBlocks(ttl_s=5.0, clock=clock)
    hashes = [11, 12, 13, 14]
    pending.book(1, hashes[1:])  # worker 1 already holds block 11 (exact index)
    assert pending.extend(hashes, {1: 1}, [1, 2]) == {1: 3}
    assert pending.extend(hashes, {}, [1, 2]) == {}  # pending starts after the exact prefix
    pending.confirm(1, [12])
    assert pending.extend(hashes, {1: 1}, [1]) == {}  # now the index's business
    pending.book(2, hashes)
    pending.refute(2, [13])
    assert pending.extend(hashes, {}, [2]) == {2: 2}
    clock.now += 3
    pending.book(2, [13])  # booked again later: outlives the first booking
    clock.now += 2.5
    assert pending.extend(hashes, {2: 2}, [2]) == {2: 1}
    clock.now += 3
    assert pending.num_blocks() == 0


async def no_snapshot(worker_id: int) -> CacheSnapshot:
    return CacheSnapshot(worker_id, 0, [])


def make_router(**overrides: object) -> KvRouter:
    config = KvRouterConfig(block_size=4, seed=0, **overrides)  # type: ignore[arg-type]
    router = KvRouter(config, no_snapshot, registry=CollectorRegistry())
    for w in (1, 2, 3, 4):
        router.on_worker_added(w)
    return router


async def test_a_prefix_routed_before_its_events_arrive_stays_together() -> None:
    # A 32-block system prompt's first request has its first token (its prefill is done)
    # but its worker's KV events have not reached the router when three more arrive:
    # pending blocks keep them on that worker; without them each looks cold and they
    # scatter over every worker.
    system = list(range(1000, 1128))
    prompts = [system + [i] * 4 for i in range(4)]
    for router, expected in ((make_router(), 1), (make_router(pending_ttl_s=0), 4)):
        picks = {(await router.schedule(prompts[0], "r0")).worker_id}
        router.on_first_token("r0")
        for i, p in enumerate(prompts[1:], 1):
            picks.add((await router.schedule(p, f"r{i}")).worker_id)
            router.on_first_token(f"r{i}")
        assert len(picks) == expected


async def test_events_settle_pending_blocks() -> None:
    router = make_router()
    prompt = list(range(64))
    first = await router.schedule(prompt, "a")
    w = first.worker_id
    assert router.explain(prompt).pending == {w: 16}
    stored = BlocksStored([StoredBlock(h, []) for h in sequence_hashes(prompt, 4)])
    router.on_kv_events([KvEvent(w, 1, stored)])
    decision = router.explain(prompt)
    assert decision.pending == {} and decision.overlaps[w] == 16  # confirmed: exact now
    router.on_kv_events([KvEvent(w, 2, AllCleared())])
    assert router.explain(prompt).overlaps[w] == 0


# --- sessions ---------------------------------------------------------------------------
def test_session_affinity_follows_the_history_chain() -> None:
    clock = Clock()
    sessions = SessionAffinity(ttl_s=60, max_sessions=2, clock=clock)
    turn1 = sequence_hashes(list(range(40)), 4)
    turn2 = sequence_hashes(list(range(40)) + list(range(500, 520)), 4)
    edited = sequence_hashes([7, *list(range(1, 40)), *list(range(500, 520))], 4)
    sessions.record("s", 3, len(turn1), turn1[-1])
    hint = sessions.lookup("s", turn2)
    assert hint is not None and (hint.worker_id, hint.blocks) == (3, 10)
    hint = sessions.lookup("s", edited)  # history rewritten: no claim, KV overlap decides
    assert hint is not None and hint.blocks == 0
    assert sessions.lookup("other", turn2) is None
    sessions.refute(3, [turn1[-1]])  # worker 3 evicted the history's last block
    assert sessions.lookup("s", turn2) is None
    sessions.record("s", 3, len(turn1), turn1[-1])
    clock.now += 61
    assert sessions.lookup("s", turn2) is None
    for key in ("a", "b", "c"):
        sessions.record(key, 1, 0, 0)
    assert len(sessions) == 2 and sessions.lookup("a", turn1) is None


async def test_a_session_turn_goes_where_its_history_is_without_events() -> None:
    router = make_router(pending_ttl_s=0)  # only the session knows where turn 1 went
    turn1 = list(range(200, 264))
    first = await router.schedule(turn1, "t1", session_id="conv")
    router.on_finished("t1")
    turn2 = turn1 + list(range(900, 940))
    decision = await router.schedule(turn2, "t2", session_id="conv")
    assert decision.worker_id == first.worker_id
    assert (decision.session_worker, decision.session_blocks) == (first.worker_id, 16)
    assert decision.overlap_blocks == 16
    other = router.explain(turn2, session_id="someone-else")
    assert other.session_worker is None and other.overlap_blocks == 0


async def test_session_eviction_event_drops_the_claim() -> None:
    router = make_router(pending_ttl_s=0)
    turn1 = list(range(64))
    w = (await router.schedule(turn1, "t1", session_id="conv")).worker_id
    last = sequence_hashes(turn1, 4)[-1]
    router.on_kv_events([KvEvent(w, 1, BlocksRemoved([last]))])
    assert router.explain([*turn1, 1, 2, 3, 4], session_id="conv").session_worker is None


async def test_replicas_share_pending_blocks_and_sessions() -> None:
    config = KvRouterConfig(block_size=4, seed=0)
    routers: list[KvRouter] = []

    def publish(message: RoutingSyncMessage) -> None:
        payload = encode_sync(message)
        for r in routers:
            r.apply_sync(decode_sync(payload))

    for i in range(2):
        r = KvRouter(config, no_snapshot, registry=CollectorRegistry(), replica_id=f"r{i}",
                     publish_sync=publish)
        for w in (1, 2, 3):
            r.on_worker_added(w)
        routers.append(r)
    a, b = routers
    prompt = list(range(300, 364))
    first = await a.schedule(prompt, "x", session_id="conv")
    a.on_first_token("x")
    seen = b.explain([*prompt, 5, 6, 7, 8], session_id="conv")
    assert seen.pending == {first.worker_id: 16}
    assert (seen.session_worker, seen.session_blocks) == (first.worker_id, 16)
    assert seen.worker_id == first.worker_id
