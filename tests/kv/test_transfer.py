"""Transfer agents between two mocker engines in one process: holds, pulls, leases, backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from kvflow.engines.base import EngineHooks
from kvflow.engines.mocker import MockerConfig, MockerEngine
from kvflow.kv.disagg import DisaggConnector, disagg_connector_factory
from kvflow.kv.transfer.agent import TransferAgent, TransferConfig
from kvflow.kv.transfer.metrics import TransferMetrics, metrics_for
from kvflow.llm.protocol import (
    PHASE_DECODE,
    PHASE_PREFILL,
    DisaggHint,
    EngineOutput,
    PreprocessedRequest,
    RoutingHints,
    StopConditions,
)
from kvflow.runtime import Context, DistributedRuntime, RuntimeConfig

BS = 4


@dataclass
class Pair:
    runtime: DistributedRuntime
    prefill: MockerEngine
    decode: MockerEngine
    agents: list[TransferAgent]
    metrics: TransferMetrics

    def connector(self, engine: MockerEngine) -> DisaggConnector:
        assert isinstance(engine.connector, DisaggConnector)
        return engine.connector


async def make_pair(backends: tuple[str, ...], lease_s: float = 30.0, **kw: object) -> Pair:
    runtime = await DistributedRuntime(RuntimeConfig(
        namespace="kvt", discovery="memory", event_plane="inproc")).start()
    metrics = metrics_for(runtime.metrics_registry)
    config = TransferConfig(lease_s=lease_s, timeout_s=5.0, backends=backends)
    agents: list[TransferAgent] = []
    engines = []
    for worker_id, component in ((11, "prefill"), (22, "backend")):
        hooks = EngineHooks(worker_id=worker_id, make_connector=disagg_connector_factory(
            runtime, component, worker_id, config, metrics, agents))
        mc = MockerConfig(**{"speedup_ratio": 0.0, "num_gpu_blocks": 64, "block_size": BS,
                             "output": "echo", **kw})  # type: ignore[arg-type]
        engine = MockerEngine(mc, hooks)
        await engine.start()
        engines.append(engine)
    for agent in agents:
        await agent.start()
    return Pair(runtime, engines[0], engines[1], agents, metrics)


async def close(pair: Pair) -> None:
    for agent in pair.agents:
        await agent.close()
    await pair.prefill.stop()
    await pair.decode.stop()
    await pair.runtime.shutdown()


@pytest.fixture(params=["shm", "tcp"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    p = await make_pair((request.param,))
    yield p
    await close(p)


def req(rid: str, prompt: list[int], max_tokens: int, hint: DisaggHint | None) -> PreprocessedRequest:
    return PreprocessedRequest(rid, prompt, stop=StopConditions(max_tokens=max_tokens),
                               routing=RoutingHints(disagg=hint))


async def collect(stream: AsyncIterator[EngineOutput]) -> list[EngineOutput]:
    return [out async for out in stream]


def counter(pair: Pair, name: str, **labels: str) -> float:
    return pair.runtime.metrics_registry.get_sample_value(name, labels) or 0.0


async def split(pair: Pair, rid: str, prompt: list[int], max_tokens: int = 5) -> list[EngineOutput]:
    """Prefill on one engine, decode on the other, as the frontend does it."""
    await collect(pair.prefill.generate(
        req(f"{rid}-p", prompt, 1, DisaggHint(PHASE_PREFILL, rid)), Context()))
    hint = DisaggHint(PHASE_DECODE, rid, source_worker=11, num_tokens=len(prompt))
    return await collect(pair.decode.generate(req(rid, prompt, max_tokens, hint), Context()))


async def test_blocks_move_and_holds_are_released(pair: Pair) -> None:
    prompt = list(range(100, 130))  # 30 tokens: 29 loaded = 8 blocks (last one partial)
    outs = await split(pair, "r1", prompt)
    assert sum(len(o.token_ids) for o in outs) == 5
    stats = outs[0].kv_transfer
    assert stats is not None and stats.blocks == 8 and stats.bytes == 8 * 2 * BS
    backend = stats.backend
    labels = {"backend": backend, "reporter": "worker"}
    assert counter(pair, "kvflow_kv_transfer_bytes_total", **labels) == stats.bytes
    assert counter(pair, "kvflow_kv_transfer_blocks_total", **labels) == 8
    await asyncio.sleep(0.05)
    assert len(pair.agents[0].holds) == 0
    assert pair.prefill.pool.num_active_blocks == 0  # the hold was freed by the scheduler
    assert pair.decode.pool.num_active_blocks == 0
    pair.decode.pool.check_invariants()


async def test_prefix_on_decode_pulls_only_the_rest(pair: Pair) -> None:
    prompt = list(range(200, 240))
    await collect(pair.decode.generate(req("warm", prompt[:20], 1, None), Context()))
    outs = await split(pair, "r2", prompt)
    stats = outs[0].kv_transfer
    assert stats is not None and stats.blocks == 10 - 5  # 5 blocks cached locally, 39 tokens
    assert outs[0].cached_tokens == 20


async def test_unheld_transfer_recomputes() -> None:
    pair = await make_pair(("tcp",))
    try:
        hint = DisaggHint(PHASE_DECODE, "never-held", source_worker=11, num_tokens=20)
        outs = await collect(pair.decode.generate(req("x", list(range(20)), 3, hint), Context()))
        assert sum(len(o.token_ids) for o in outs) == 3 and outs[-1].error is None
        assert outs[0].kv_transfer is None
        assert counter(pair, "kvflow_kv_transfer_failures_total", reason="not_held") == 1
        assert pair.decode.scheduler.loads.num_failed == 1
    finally:
        await close(pair)


async def test_lease_releases_blocks_nobody_pulls() -> None:
    pair = await make_pair(("tcp",), lease_s=0.2)
    try:
        await collect(pair.prefill.generate(
            req("p", list(range(40)), 1, DisaggHint(PHASE_PREFILL, "t")), Context()))
        assert pair.prefill.pool.num_active_blocks == 10
        for _ in range(100):
            await asyncio.sleep(0.05)
            if pair.prefill.pool.num_active_blocks == 0:
                break
        assert pair.prefill.pool.num_active_blocks == 0
        assert pair.agents[0].holds.num_expired == 1
    finally:
        await close(pair)


async def test_mismatched_layout_is_refused_naming_both_sizes() -> None:
    pair = await make_pair(("tcp",))
    try:
        other = MockerConfig(speedup_ratio=0.0, num_gpu_blocks=64, block_size=8, output="echo")
        agents: list[TransferAgent] = []
        hooks = EngineHooks(worker_id=33, make_connector=disagg_connector_factory(
            pair.runtime, "backend8", 33, TransferConfig(backends=("tcp",)), pair.metrics, agents))
        decode8 = MockerEngine(other, hooks)
        await decode8.start()
        await agents[0].start()
        await collect(pair.prefill.generate(
            req("p", list(range(40)), 1, DisaggHint(PHASE_PREFILL, "t8")), Context()))
        with pytest.raises(Exception, match="block_size: this worker 8 vs peer 4"):
            await agents[0].pull(11, "t8", 0, [0, 1])
        await agents[0].close()
        await decode8.stop()
    finally:
        await close(pair)
