"""Tensor parallelism on CPU (gloo): TP=2 greedy output token-identical to TP=1, sharded loading."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest
import torch

from kvflow.engines.native.config import ModelConfig
from kvflow.engines.native.parallel import TensorParallelError, shard_config, split_dim
from kvflow.kv.blocks import BlockRun
from kvflow.kv.heads import copy_run_heads
from kvflow.kv.shm import SharedRegion
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.llm.protocol import PreprocessedRequest, StopConditions
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens

# Budget 16 tokens/step: the 37-token prompt takes three chunks; the batch mixes prefill and decode.
BLOCK = 4  # small_native_engine's block size
PROMPTS = [prompt_ids(n, seed=n) for n in (3, 19, 37)]


def _request(i: int, prompt: list[int]) -> PreprocessedRequest:
    """Greedy, 8 tokens, EOS ignored (so every row decodes the whole way)."""
    request = greedy_request(f"r{i}", prompt, 8)
    return msgspec.structs.replace(request, stop=StopConditions(max_tokens=8, ignore_eos=True))


class Run(NamedTuple):
    outputs: list[list[int]]
    kv: torch.Tensor  # the prompts' KV blocks [layer, 2, block, token, head, dim], all heads


async def _greedy(path: Path, tp: int) -> Run:
    """Greedy outputs of PROMPTS and, after them, the engine's KV with every head: at TP=2
    each rank's KV heads sit in its own process's /dev/shm region and are re-sliced here."""
    engine = await small_native_engine(path, tensor_parallel_size=tp, shared_kv=tp > 1)
    try:
        assert engine.runner.cfg.num_kv_heads == 2 // tp  # this rank's share of the KV heads
        outs = await asyncio.gather(*(collect(engine, _request(i, p)) for i, p in enumerate(PROMPTS)))
        kv = engine.runner.kv_memory.whole if tp == 1 else _resliced(engine)
        return Run([tokens(o) for o in outs], _prompt_blocks(engine, kv))
    finally:
        await engine.stop()


def _prompt_blocks(engine: Any, kv: torch.Tensor) -> torch.Tensor:
    """The cached KV blocks of every prompt, in prompt order (block ids depend on timing)."""
    ids = [b for p in PROMPTS for b in engine.pool.match_prefix(sequence_hashes(p, BLOCK))]
    assert len(ids) == sum(len(p) // BLOCK for p in PROMPTS)
    return kv[:, :, ids].clone()


def _resliced(engine: Any) -> torch.Tensor:
    """The TP=2 engine's two KV shards (rank 0's and rank 1's regions) as one TP=1 memory."""
    names = [engine.runner.shared_region_name(), *engine._ranks.kv_regions]
    shards = [SharedRegion.attach(name) for name in names]
    layout = engine.runner.block_io().layout
    whole = msgspec.structs.replace(layout, num_kv_heads=2 * layout.num_kv_heads)
    local = engine.runner.kv_memory.whole
    dst = torch.zeros((*local.shape[:-2], whole.num_kv_heads, local.shape[-1]), dtype=local.dtype)
    dst_view = memoryview(dst.view(-1).view(torch.uint8).numpy())
    moved = copy_run_heads([(layout, s.view) for s in shards], [(whole, dst_view)],
                           BlockRun(0, 0, layout.num_slots))
    assert moved == dst.numel() * dst.element_size()
    for shard in shards:
        shard.close()
    return dst


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
async def test_tp2_greedy_matches_tp1(name: str, tiny_models: Callable[[str], Path]) -> None:
    path = tiny_models(name)
    single = await _greedy(path, 1)
    split = await _greedy(path, 2)
    assert split.outputs == single.outputs
    assert all(len(t) == 8 for t in single.outputs)
    # The re-sliced shards hold the KV the TP=1 engine computed for the same prompts.
    assert single.kv.abs().sum() > 0
    torch.testing.assert_close(split.kv, single.kv, atol=1e-5, rtol=1e-4)


def test_shard_config_and_split_rules(tiny_models: Callable[[str], Path]) -> None:
    cfg = ModelConfig.from_dir(tiny_models("llama"))
    half = shard_config(cfg, 2)
    assert (half.num_heads, half.num_kv_heads, half.intermediate_size) == (2, 1, 64)
    assert half.hidden_size == cfg.hidden_size and half.head_dim == cfg.head_dim
    with pytest.raises(TensorParallelError, match="KV heads 2"):
        shard_config(cfg, 4)
    assert split_dim("model.layers.0.self_attn.k_proj.weight") == 0
    assert split_dim("model.layers.0.self_attn.q_proj.bias") == 0
    assert split_dim("model.layers.0.mlp.down_proj.weight") == 1
    assert split_dim("model.layers.0.self_attn.q_norm.weight") is None
    assert split_dim("model.embed_tokens.weight") is None


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)])
async def test_disaggregated_between_tp_sizes_matches_aggregated_tp1(
    tiny_models: Callable[[str], Path], prefill_tp: int, decode_tp: int,
) -> None:
    """A prefill engine and a decode engine of different TP sizes (the TP=2 one has its rank 1
    in its own process, KV heads split over two /dev/shm regions): the decode engine pulls
    the prompt's KV over shm and then over tcp (heads re-sliced both times; at TP=2 decode
    rank 0 writes rank 1's heads into its region) and its greedy output equals the TP=1
    engine's own aggregated output."""
    import dataclasses

    from kvflow.engines.base import EngineHooks
    from kvflow.kv.disagg import disagg_connector_factory
    from kvflow.kv.transfer.agent import TransferAgent, TransferConfig
    from kvflow.kv.transfer.metrics import metrics_for
    from kvflow.llm.protocol import PHASE_DECODE, PHASE_PREFILL, DisaggHint, RoutingHints
    from kvflow.runtime import DistributedRuntime, RuntimeConfig

    path = tiny_models("llama")
    runtime = await DistributedRuntime(RuntimeConfig(
        namespace="tpkv", discovery="memory", event_plane="inproc")).start()
    config = TransferConfig(timeout_s=10.0, backends=("shm", "tcp"), chunk_bytes=4096)
    agents: list[TransferAgent] = []
    engines = []
    try:
        for worker_id, component, tp in ((11, "prefill", prefill_tp), (22, "backend", decode_tp)):
            hooks = EngineHooks(worker_id=worker_id, make_connector=disagg_connector_factory(
                runtime, component, worker_id, config, metrics_for(runtime.metrics_registry), agents))
            engines.append(await small_native_engine(path, hooks, tensor_parallel_size=tp))
        for agent in agents:
            await agent.start()
        assert [a.info.shards for a in agents] == [prefill_tp, decode_tp]
        assert agents[0].info.backends == ["shm", "tcp"]
        aggregated = engines[0] if prefill_tp == 1 else engines[1]
        for n, backend in enumerate(["shm", "tcp"]):
            agents[1].config = dataclasses.replace(config, backends=(backend,))
            prompt = prompt_ids(29, seed=3 + n)
            tid = f"t-{backend}"
            first = greedy_request(f"{tid}-p", prompt, 1)
            routing = RoutingHints(disagg=DisaggHint(PHASE_PREFILL, tid))
            await collect(engines[0], msgspec.structs.replace(first, routing=routing))
            hint = DisaggHint(PHASE_DECODE, tid, source_worker=11, num_tokens=len(prompt))
            decode = msgspec.structs.replace(_request(n, prompt), routing=RoutingHints(disagg=hint))
            outs = await collect(engines[1], decode)
            stats = outs[0].kv_transfer
            assert stats is not None and stats.backend == backend and stats.blocks == 7
            # 2 layers x K,V x 4 tokens x 2 KV heads x 16 dims x 4 bytes per block, every head once
            assert stats.bytes == 7 * 2048
            # The reference: the TP=1 engine alone, its prefix cache kept apart by a salt.
            alone = msgspec.structs.replace(_request(n, prompt), request_id=f"agg-{n}", cache_salt="agg")
            want = tokens(await collect(aggregated, alone))
            assert len(want) == 8 and tokens(outs) == want
    finally:
        for agent in agents:
            await agent.close()
        for engine in engines:
            await engine.stop()
        await runtime.shutdown()


def test_tensor_parallel_refuses_kv_tiers_and_bad_sizes() -> None:
    from kvflow.engines.native.config import NativeEngineConfig
    from kvflow.kv.tiers.config import TierConfig

    with pytest.raises(ValueError, match="KV tiers do not work with --tensor-parallel-size"):
        NativeEngineConfig(model_path="m", tensor_parallel_size=2,
                           tiers=TierConfig(host_kv_cache_gb=1.0))
    with pytest.raises(ValueError, match="must be >= 1"):
        NativeEngineConfig(model_path="m", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="--batch-invariant works with --tensor-parallel-size 1 or 2"):
        NativeEngineConfig(model_path="m", tensor_parallel_size=4, batch_invariant=True)
    NativeEngineConfig(model_path="m", tensor_parallel_size=2, batch_invariant=True)  # accepted


async def test_tensor_parallel_refuses_an_fp8_checkpoint_before_starting_ranks(
        tiny_models: Callable[[str], Path], tmp_path: Path) -> None:
    from kvflow.engines.native.config import UnsupportedModelError
    from kvflow.testing.fp8 import make_fp8_checkpoint

    fp8 = make_fp8_checkpoint(tiny_models("llama"), tmp_path / "fp8", "fbgemm_fp8", "channel")
    with pytest.raises(UnsupportedModelError, match="use --tensor-parallel-size 1 or a bf16 copy"):
        await small_native_engine(fp8, tensor_parallel_size=2)
