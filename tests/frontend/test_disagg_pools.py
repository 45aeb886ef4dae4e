"""The frontend's KV layout check between a model's prefill and decode workers, tensor parallel
included: heads count over all of a worker's ranks."""

from __future__ import annotations

import msgspec
import pytest

from kvflow.frontend.disagg_pools import DisaggPools
from kvflow.kv.layout import KvLayout
from kvflow.kv.transfer.messages import AgentInfo, agent_key
from kvflow.llm.model_card import ModelCard
from kvflow.llm.register import ModelEntry
from kvflow.router.config import KvRouterConfig
from kvflow.runtime import DistributedRuntime, RuntimeConfig


async def _publish(runtime: DistributedRuntime, worker: int, heads_per_rank: int, shards: int) -> None:
    layout = KvLayout(num_layers=2, block_size=8, num_kv_heads=heads_per_rank, head_dim=16,
                      dtype="bfloat16", num_slots=64)
    info = AgentInfo(worker, "ns.prefill.kv_transfer", layout, "host", ["tcp"], shards=shards)
    await runtime.discovery.put(agent_key("ns", worker), msgspec.msgpack.encode(info))


def _entry(worker: int, role: str) -> ModelEntry:
    card = ModelCard(name="m", model_path="/m", source="m", tokenizer_checksum="x", context_length=64)
    return ModelEntry("m", "ns.backend.generate", worker, card, role=role)


async def test_workers_of_different_tp_sizes_share_a_pool_unless_the_heads_differ(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = await DistributedRuntime(RuntimeConfig(
        namespace="ns", discovery="memory", event_plane="inproc")).start()
    try:
        pools = DisaggPools(runtime, KvRouterConfig())
        await _publish(runtime, 1, heads_per_rank=4, shards=2)  # TP=2 prefill: 8 heads
        await _publish(runtime, 2, heads_per_rank=8, shards=1)  # TP=1 decode: 8 heads
        await _publish(runtime, 3, heads_per_rank=2, shards=2)  # TP=2 of a 4-head model
        assert await pools.admit(_entry(1, "prefill"))
        assert await pools.admit(_entry(2, "decode"))
        assert not await pools.admit(_entry(3, "decode"))
        assert "num_kv_heads: new 4 vs pool's 8" in caplog.text
    finally:
        await runtime.shutdown()
