"""Tensor parallelism on CPU (gloo): TP=2 greedy output token-identical to TP=1, sharded loading."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from kvflow.engines.native.config import ModelConfig
from kvflow.engines.native.parallel import TensorParallelError, shard_config, split_dim
from kvflow.llm.protocol import PreprocessedRequest, StopConditions
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens

# Budget 16 tokens/step: the 37-token prompt takes three chunks; the batch mixes prefill and decode.
PROMPTS = [prompt_ids(n, seed=n) for n in (3, 19, 37)]


def _request(i: int, prompt: list[int]) -> PreprocessedRequest:
    """Greedy, 8 tokens, EOS ignored (so every row decodes the whole way)."""
    request = greedy_request(f"r{i}", prompt, 8)
    return msgspec.structs.replace(request, stop=StopConditions(max_tokens=8, ignore_eos=True))


async def _greedy(path: Path, tp: int) -> list[list[int]]:
    engine = await small_native_engine(path, tensor_parallel_size=tp)
    try:
        assert engine.runner.cfg.num_kv_heads == 2 // tp  # this rank's share of the KV heads
        outs = await asyncio.gather(
            *(collect(engine, _request(i, p)) for i, p in enumerate(PROMPTS))
        )
        return [tokens(o) for o in outs]
    finally:
        await engine.stop()


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
async def test_tp2_greedy_matches_tp1(name: str, tiny_models: Callable[[str], Path]) -> None:
    path = tiny_models(name)
    single = await _greedy(path, 1)
    split = await _greedy(path, 2)
    assert split == single
    assert all(len(t) == 8 for t in single)


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
