"""NativeEngine end to end on CPU: token-for-token equality with transformers, caching, preemption, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch

from kvflow.engines.base import EngineHooks
from kvflow.engines.native.engine import NativeEngine
from kvflow.llm.kv_events import BlocksStored, KvEvent, LoadMetrics
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest, StopConditions
from kvflow.runtime.context import Context
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens

BLOCK = 4
Greedy = Callable[[Path, list[int], int], list[int]]


@pytest.fixture
async def llama(tiny_models: Callable[[str], Path]) -> AsyncIterator[tuple[NativeEngine, Path]]:
    path = tiny_models("llama")
    engine = await small_native_engine(path)
    yield engine, path
    await engine.stop()


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral"])
async def test_greedy_batch_matches_transformers_generate(
    name: str, tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    path = tiny_models(name)
    engine = await small_native_engine(path)  # budget 16 tokens/step: prompts are chunked and mixed
    try:
        prompts = [prompt_ids(n, seed=n) for n in (1, 6, 19, 37)]
        outs = await asyncio.gather(
            *(collect(engine, greedy_request(f"r{i}", p, 10)) for i, p in enumerate(prompts))
        )
        for prompt, out in zip(prompts, outs, strict=True):
            assert tokens(out) == hf_greedy(path, prompt, 10)
            assert out[-1].finish_reason in ("length", "stop")
    finally:
        await engine.stop()


async def test_prefix_cache_hit_reports_cached_tokens_and_still_matches(
    llama: tuple[NativeEngine, Path], hf_greedy: Greedy
) -> None:
    engine, path = llama
    shared = prompt_ids(14, seed=3)
    first = await collect(engine, greedy_request("a", shared, 4))
    assert first[0].cached_tokens == 0
    second_prompt = shared + prompt_ids(5, seed=4)
    second = await collect(engine, greedy_request("b", second_prompt, 8))
    assert second[0].cached_tokens == 12  # three full blocks of the shared prefix
    assert tokens(second) == hf_greedy(path, second_prompt, 8)


async def test_preemption_by_recompute_keeps_outputs_exact(
    tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    path = tiny_models("llama")
    engine = await small_native_engine(path, num_gpu_blocks=12, max_model_len=48)  # 48 tokens for 3 x 26
    assert engine.scheduler is not None
    preempted: list[str] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():  # type: ignore[no-untyped-def]
        out = schedule()
        preempted.extend(s.request_id for s in out.preempted)
        return out

    engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    try:
        prompts = [prompt_ids(10, seed=20 + i) for i in range(3)]
        outs = await asyncio.gather(
            *(collect(engine, greedy_request(f"p{i}", p, 16)) for i, p in enumerate(prompts))
        )
        assert preempted, "the pool was meant to run out and force a preemption"
        for prompt, out in zip(prompts, outs, strict=True):
            assert tokens(out) == hf_greedy(path, prompt, 16)
    finally:
        await engine.stop()


async def test_logprobs_match_transformers_log_softmax(
    llama: tuple[NativeEngine, Path], hf_model: Callable[[Path], object]
) -> None:
    engine, path = llama
    prompt = prompt_ids(9, seed=5)
    outs = await collect(engine, greedy_request("lp", prompt, 6, logprobs=3))
    out_ids = tokens(outs)
    logprobs = [lp for o in outs for lp in (o.logprobs or [])]
    tops = [t for o in outs for t in (o.top_logprobs or [])]
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt + out_ids])).logits[0]  # type: ignore[operator]
    ref = torch.log_softmax(logits.float(), -1)[len(prompt) - 1 : -1]
    assert len(logprobs) == len(out_ids) == len(tops) == 6
    for i, token in enumerate(out_ids):
        assert abs(logprobs[i] - ref[i, token].item()) < 1e-4  # stated tolerance: 1e-4 nats
        assert [t.token_id for t in tops[i]] == ref[i].topk(3).indices.tolist()


async def test_seeded_sampling_is_reproducible(llama: tuple[NativeEngine, Path]) -> None:
    engine, _ = llama
    prompt = prompt_ids(7, seed=6)

    def req(rid: str, seed: int) -> PreprocessedRequest:
        return greedy_request(rid, prompt, 12, temperature=1.0, top_p=0.9, seed=seed)

    alone = tokens(await collect(engine, req("s1", 1234)))
    crowd = await asyncio.gather(
        collect(engine, req("s2", 1234)),
        collect(engine, req("s3", 99)),
        collect(engine, greedy_request("s4", prompt_ids(30, seed=7), 12, temperature=1.0)),
    )
    assert tokens(crowd[0]) == alone
    assert tokens(crowd[1]) != alone


async def test_cancellation_frees_blocks_at_once(llama: tuple[NativeEngine, Path]) -> None:
    engine, _ = llama
    assert engine.pool is not None
    ctx = Context()
    outs: list[EngineOutput] = []
    async for out in engine.generate(greedy_request("c", prompt_ids(21, seed=8), 200), ctx):
        outs.append(out)
        if len(outs) == 2:
            assert engine.pool.num_active_blocks > 0
            ctx.stop_generating()
            assert engine.pool.num_active_blocks == 0  # freed before the next step
    assert outs[-1].finish_reason == "cancelled"
    assert len(tokens(outs)) < 200


async def test_stop_token_and_min_tokens(llama: tuple[NativeEngine, Path], hf_greedy: Greedy) -> None:
    engine, path = llama
    prompt = prompt_ids(8, seed=2)
    expected = hf_greedy(path, prompt, 6)
    stop_at = expected[2]
    req = greedy_request("st", prompt, 6)
    req.stop = StopConditions(max_tokens=6, stop_token_ids=[stop_at])
    outs = await collect(engine, req)
    assert tokens(outs) == expected[: expected.index(stop_at) + 1]
    assert outs[-1].finish_reason == "stop"


async def test_kv_events_and_load_metrics_are_published(tiny_models: Callable[[str], Path]) -> None:
    events: list[KvEvent] = []
    loads: list[LoadMetrics] = []
    hooks = EngineHooks(worker_id=7, publish_kv_events=events.extend, publish_load=loads.append)
    engine = await small_native_engine(tiny_models("llama"), hooks)
    try:
        prompt = prompt_ids(17, seed=9)
        outs = await collect(engine, greedy_request("ev", prompt, 5))
        await asyncio.sleep(0.05)  # the idle load report comes after the last step
        stored = [b.block_hash for e in events if isinstance(e.data, BlocksStored)
                  for b in e.data.blocks]
        full = sequence_hashes(prompt + tokens(outs), BLOCK)
        assert stored == full[: len(stored)] and len(stored) >= 4
        assert all(e.worker_id == 7 for e in events)
        assert loads and loads[-1].num_running == 0 and loads[-1].total_blocks == 128
        snapshot = engine.cache_snapshot()
        assert snapshot is not None and [b.block_hash for b in snapshot.blocks] == stored
    finally:
        await engine.stop()


async def test_bad_requests_fail_with_a_clear_error(llama: tuple[NativeEngine, Path]) -> None:
    engine, _ = llama
    outs = await collect(engine, greedy_request("bad", [5, 100000], 3))
    assert outs[-1].finish_reason == "error" and "vocabulary" in (outs[-1].error or "")
    outs = await collect(engine, greedy_request("long", prompt_ids(300, seed=1), 3))
    assert outs[-1].finish_reason == "error" and "context" in (outs[-1].error or "")
