"""--batch-invariant: a prompt's tokens and logprobs are bit-identical alone, batched and chunked."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvflow.engines.native.attention import context_mask
from kvflow.engines.native.invariant import InvariantOps, sequence_attention
from kvflow.llm.protocol import EngineOutput
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens

LENGTHS = (3, 17, 40, 70, 9, 130)


def _logprobs(outs: list[EngineOutput]) -> list[float]:
    return [lp for o in outs for lp in (o.logprobs or [])]


async def _run(path: Path, prompts: list[list[int]], together: bool, **config: object) -> list:
    engine = await small_native_engine(path, batch_invariant=True, num_gpu_blocks=512,
                                       max_model_len=512, **config)
    try:
        reqs = [greedy_request(f"r{i}", p, 12, logprobs=1) for i, p in enumerate(prompts)]
        # one seeded random-sampling request: its own generator makes it invariant too
        reqs.append(greedy_request("seeded", prompts[2], 12, temperature=1.0, seed=7, logprobs=1))
        if together:
            outs = await asyncio.gather(*(collect(engine, r) for r in reqs))
        else:
            outs = [await collect(engine, r) for r in reqs]
        return [(tokens(o), _logprobs(o)) for o in outs]
    finally:
        await engine.stop()


@pytest.mark.parametrize("name", ["llama_bf16", "mistral"])
async def test_alone_together_and_chunked_are_identical(
    name: str, tiny_models: Callable[[str], Path]
) -> None:
    path = tiny_models(name)
    prompts = [prompt_ids(n, seed=100 + n) for n in LENGTHS]
    alone = await _run(path, prompts, together=False, max_num_batched_tokens=256)
    together = await _run(path, prompts, together=True, max_num_batched_tokens=256)
    chunked = await _run(path, prompts, together=True, max_num_batched_tokens=16)
    assert all(len(t) == 12 and len(lp) == 12 for t, lp in alone)
    assert together == alone  # tokens and logprobs, compared exactly
    assert chunked == alone


def test_linear_and_norm_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    ops = InvariantOps()
    w = torch.randn(96, 80, dtype=torch.bfloat16)
    norm_w = torch.randn(80, dtype=torch.bfloat16)
    x = torch.randn(300, 80, dtype=torch.bfloat16)
    whole = ops.norm_linear(x, None, norm_w, 1e-6, w, None).out
    for lo, hi in ((0, 1), (5, 6), (7, 135), (200, 300)):
        part = ops.norm_linear(x[lo:hi], None, norm_w, 1e-6, w, None).out
        assert torch.equal(part, whole[lo:hi])


@pytest.mark.parametrize("window", [None, 20])
def test_attention_rows_do_not_depend_on_chunking(window: int | None) -> None:
    torch.manual_seed(1)
    seq_len, heads, kv_heads, dim = 150, 4, 2, 16
    q = torch.randn(seq_len, heads, dim)
    keys, values = torch.randn(seq_len, kv_heads, dim), torch.randn(seq_len, kv_heads, dim)
    whole = sequence_attention(q, keys, values, 0.25, window)
    # a reference: plain masked softmax attention in float64
    k = keys.double().repeat_interleave(2, dim=1).transpose(0, 1)
    v = values.double().repeat_interleave(2, dim=1).transpose(0, 1)
    scores = (q.double().transpose(0, 1) @ k.transpose(1, 2)) * 0.25
    scores = scores.masked_fill(~context_mask(seq_len, seq_len, window, q.device), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(0, 1)
    assert (whole.double() - ref).norm() / ref.norm() < 1e-5
    for start, stop in ((0, 10), (10, 11), (11, 100), (149, 150)):  # chunks, as prefill sees them
        part = sequence_attention(q[start:stop], keys[:stop], values[:stop], 0.25, window)
        assert torch.equal(part, whole[start:stop])


def test_warm_up_runs_every_size_class(tiny_models: Callable[[str], Path]) -> None:
    from kvflow.engines.native.attention import make_backend
    from kvflow.engines.native.config import ModelConfig
    from kvflow.engines.native.kv_cache import KvCacheLayout, allocate_kv_cache
    from kvflow.engines.native.warmup import prefill_lengths, warm_up
    from kvflow.engines.native.weights import load_model

    path, cpu = tiny_models("llama"), torch.device("cpu")
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, make_backend("torch", cpu), 512, cpu, torch.float32)
    layout = KvCacheLayout(64, 4, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    model.set_kv_caches(allocate_kv_cache(layout, cpu))
    done = warm_up(model, 4, 64, 128, (1, 8), cpu)
    assert done.prefill_lengths == prefill_lengths(128) == (1, 2, 8, 16, 64, 65, 128)
    assert done.decode_batches == (1, 8) and "warmed prefill chunks" in done.describe()


def test_serving_path_warm_up_runs_on_a_private_pool(tiny_models: Callable[[str], Path]) -> None:
    from kvflow.engines.native.config import NativeEngineConfig
    from kvflow.engines.native.runner import ModelRunner
    from kvflow.engines.native.warmup import warm_serving_path

    runner = ModelRunner.load(NativeEngineConfig(
        model_path=str(tiny_models("llama")), device="cpu", block_size=4, num_gpu_blocks=512,
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512))
    steps = warm_serving_path(runner)
    assert steps > 300 // 64  # 9 requests of up to 300 prompt tokens, 64-token steps, 3 tokens each


def test_attention_packs_query_heads_where_the_tiles_fit() -> None:
    from kvflow.engines.native.invariant import packs

    assert packs(4, 8192, 1)  # 4 queries a tile: 2049 tiles
    assert not packs(3, 100, 1)  # 3 does not divide 16 rows
    assert packs(16, 65_000, 500)  # one query a tile: 65,500 tiles fit
    assert not packs(16, 65_100, 500)  # 65,600 do not: the step's tiles hold 16 queries each
    assert packs(8, 131_000, 1) and not packs(8, 131_070, 1)
