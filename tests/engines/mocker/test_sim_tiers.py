"""The mocker's simulated KV tiers: evicted prefixes come back from host, disk, shared G4."""

from __future__ import annotations

import pytest

from kvflow.engines.base import EngineHooks
from kvflow.engines.mocker import MockerConfig, MockerEngine
from kvflow.engines.mocker.sim_tiers import SharedSimStore, SimLink, SimTier, SimTiers
from kvflow.llm.kv_events import BlocksRemoved, BlocksStored, KvEvent, LoadMetrics
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest, StopConditions
from kvflow.runtime.context import Context

PROMPT = list(range(100, 164))  # 16 blocks of 4
OTHER = list(range(500, 580))  # 20 blocks: pushes PROMPT out of a 24-block GPU


def request(rid: str, tokens: list[int]) -> PreprocessedRequest:
    return PreprocessedRequest(rid, tokens, stop=StopConditions(max_tokens=2, ignore_eos=True))


async def first_output(engine: MockerEngine, rid: str, tokens: list[int]) -> EngineOutput:
    outs = [o async for o in engine.generate(request(rid, tokens), Context())]
    return next(o for o in outs if o.cached_tokens is not None)


async def started(events: list[KvEvent], loads: list[LoadMetrics], store: SharedSimStore | None = None,
                  **config: object) -> MockerEngine:
    cfg = MockerConfig(num_gpu_blocks=24, block_size=4, speedup_ratio=0, **config)  # type: ignore[arg-type]
    engine = MockerEngine(cfg, EngineHooks(1, events.extend, loads.append), object_store=store)
    await engine.start()
    return engine


async def test_host_then_disk_serve_an_evicted_prefix_and_routers_hear_of_it() -> None:
    events: list[KvEvent] = []
    loads: list[LoadMetrics] = []
    engine = await started(events, loads, num_host_blocks=4, num_disk_blocks=64)
    try:
        for rid in ("a", "b"):  # two uses: the disk admits PROMPT's blocks
            await first_output(engine, rid, PROMPT)
        await first_output(engine, "other", OTHER)
        await first_output(engine, "other2", OTHER[::-1])
        out = await first_output(engine, "again", PROMPT)
        assert out.cached_tokens_by_tier is not None and out.cached_tokens_by_tier.get("disk", 0) > 0
        assert out.cached_tokens == sum(out.cached_tokens_by_tier.values()) >= 60
        media = {e.data.medium for e in events if isinstance(e.data, BlocksStored)}
        assert {"host", "disk"} <= media
        assert loads[-1].tier_block_s is not None and "disk" in loads[-1].tier_block_s
    finally:
        await engine.stop()


async def test_object_store_is_shared_between_engines() -> None:
    store = SharedSimStore(bandwidth=50e9, latency_s=0)  # fast enough to beat recomputing 4-token blocks
    events: list[KvEvent] = []
    a = await started(events, [], store)
    b = await started([], [], store)
    try:
        await first_output(a, "a", PROMPT)
        await first_output(a, "other", list(range(500, 594)))  # A evicts all of PROMPT to G4
        out = await first_output(b, "b", PROMPT)  # B never computed it
        assert out.cached_tokens_by_tier == {"object": 60}
    finally:
        await a.stop()
        await b.stop()


def test_loads_of_one_engine_queue_on_its_link_but_their_latencies_overlap() -> None:
    link = SimLink()
    assert link.finish(10.0, 0.001, 0.010) == pytest.approx(10.011)
    assert link.finish(10.0, 0.001, 0.010) == pytest.approx(10.021)  # at once: after the first
    assert link.finish(10.5, 0.005, 0.010) == pytest.approx(10.515)  # the link was idle again


def test_one_eviction_batch_is_announced_as_one_stored_and_one_removed_event_per_tier() -> None:
    host = SimTier("host", capacity=3, bandwidth=25e9)
    sim = SimTiers([host], block_size=4, bytes_per_block=4.0, recompute_s_per_block=1.0)
    announced: list[BlocksStored | BlocksRemoved] = []
    sim.record_event = announced.append
    sim.offload([1, 2])
    sim.offload([3, 4, 5])  # the host holds 3: 1 and 2 go
    assert [(type(e).__name__, e.medium) for e in announced] == [
        ("BlocksStored", "host"), ("BlocksStored", "host"), ("BlocksRemoved", "host")]
    assert [b.block_hash for b in announced[1].blocks] == [3, 4, 5]
    assert announced[2].block_hashes == [1, 2]
    assert list(host.lru) == [3, 4, 5] and sim.offloaded_blocks == {"host": 5}


def test_a_batch_reaches_the_disk_on_its_second_use_and_the_shared_store_once() -> None:
    disk = SimTier("disk", capacity=0, bandwidth=7e9)
    store = SharedSimStore()
    sim = SimTiers([disk, store], block_size=4, bytes_per_block=4.0, recompute_s_per_block=1.0)
    announced: list[BlocksStored | BlocksRemoved] = []
    sim.record_event = announced.append
    sim.admission.note([1, 2])
    sim.admission.note([2])  # block 2 used twice: the disk admits it
    sim.offload([1, 2])
    sim.offload([2, 3])  # the store has 2 already
    assert list(disk.lru) == [2] and list(store.lru) == [1, 2, 3]
    stored = [(e.medium, [b.block_hash for b in e.blocks]) for e in announced
              if isinstance(e, BlocksStored)]
    assert stored == [("disk", [2]), ("object", [1, 2]), ("disk", [2]), ("object", [3])]
