"""Replica sync: two routers sharing decisions converge on the same load view."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from kvflow.llm.kv_events import CacheSnapshot
from kvflow.router import KvRouter, KvRouterConfig, RoutingSyncMessage, decode_sync, encode_sync

PROMPT = list(range(40))


async def no_snapshot(worker_id: int) -> CacheSnapshot:
    raise AssertionError("these tests send no KV events")


class Bus:
    """Delivers every published message, encoded on the wire, to every replica."""

    def __init__(self) -> None:
        self.routers: list[KvRouter] = []
        self.sent = 0

    def publish(self, message: RoutingSyncMessage) -> None:
        payload = encode_sync(message)
        self.sent += 1
        for router in self.routers:
            router.apply_sync(decode_sync(payload))


def replicas(n: int, **overrides: object) -> tuple[list[KvRouter], Bus]:
    bus = Bus()
    config = KvRouterConfig(block_size=8, seed=0, **overrides)  # type: ignore[arg-type]
    for i in range(n):
        router = KvRouter(config, no_snapshot, registry=CollectorRegistry(),
                          replica_id=f"replica-{i}", publish_sync=bus.publish)
        for w in (1, 2, 3):
            router.on_worker_added(w)
        bus.routers.append(router)
    return bus.routers, bus


def views(routers: list[KvRouter]) -> list[dict[int, tuple[int, int, int]]]:
    out = []
    for r in routers:
        loads = r.active_load.snapshot([1, 2, 3])
        out.append({w: (x.prefill_tokens, x.decode_blocks, x.active_requests)
                    for w, x in loads.items()})
    return out


async def test_replicas_agree_on_load() -> None:
    (a, b), bus = replicas(2)
    await a.schedule(PROMPT, "x")
    await b.schedule(PROMPT, "y")
    await a.schedule(PROMPT, "z")
    va, vb = views([a, b])
    assert va == vb
    assert sum(v[2] for v in va.values()) == 3
    a.on_first_token("x")
    b.on_finished("y")
    va, vb = views([a, b])
    assert va == vb
    assert sum(v[2] for v in va.values()) == 2
    assert bus.sent == 5


async def test_replicas_spread_load_like_one_router() -> None:
    (a, b), _ = replicas(2)
    picks = [(await r.schedule(PROMPT, f"{i}")).worker_id for i, r in enumerate([a, b, a])]
    assert sorted(picks) == [1, 2, 3]


async def test_own_messages_are_ignored() -> None:
    (a,), _ = replicas(1)
    await a.schedule(PROMPT, "x")  # the bus echoes it back to a
    assert a.active_load.load(a.active_load.worker_of("x") or 0).active_requests == 1


async def test_departed_replica_load_is_dropped() -> None:
    (a, b), _ = replicas(2)
    await b.schedule(PROMPT, "x")
    assert len(a.active_load.request_ids()) == 1
    a.on_replica_removed("replica-1")
    assert a.active_load.request_ids() == []


async def test_approximate_replicas_share_cached_prefixes() -> None:
    (a, b), _ = replicas(2, use_kv_events=False)
    first = await a.schedule(PROMPT, "x")
    a.on_finished("x")
    assert b.explain(PROMPT).worker_id == first.worker_id
    assert b.explain(PROMPT).overlap_blocks == 5
