"""NativeEngine with async output on CPU: each step launches before the last one's tokens
reach the host, and the results are exactly the synchronous engine's (and transformers')."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from kvflow.engines.base import EngineHooks
from kvflow.engines.native.engine import NativeEngine
from kvflow.llm.kv_events import BlocksStored, KvEvent
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.llm.protocol import EngineOutput, StopConditions
from kvflow.runtime.context import Context
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens

BLOCK = 4
Greedy = Callable[[Path, list[int], int], list[int]]


@pytest.fixture
async def pipelined(tiny_models: Callable[[str], Path]) -> AsyncIterator[tuple[NativeEngine, Path]]:
    path = tiny_models("llama")
    engine = await small_native_engine(path, async_output=True)
    assert engine.scheduler is not None and engine.scheduler.config.async_output
    yield engine, path
    await engine.stop()


@pytest.mark.parametrize("name", ["llama", "mistral"])
async def test_chunked_and_mixed_batches_match_transformers(
    name: str, tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    """Prefill chunks share steps with decodes whose input token is still on the device."""
    path = tiny_models(name)
    engine = await small_native_engine(path, async_output=True)
    runner = engine.runner
    assert runner is not None
    chained: list[int] = []
    logits = runner.logits

    def recording_logits(inputs):  # type: ignore[no-untyped-def]
        rows = inputs.chain_rows
        chained.append(0 if rows is None else int((rows >= 0).sum()))
        return logits(inputs)

    runner.logits = recording_logits  # type: ignore[method-assign]
    try:
        prompts = [prompt_ids(n, seed=n) for n in (1, 6, 19, 37)]
        outs = await asyncio.gather(
            *(collect(engine, greedy_request(f"r{i}", p, 10)) for i, p in enumerate(prompts))
        )
        for prompt, out in zip(prompts, outs, strict=True):
            assert tokens(out) == hf_greedy(path, prompt, 10)
        assert sum(c > 0 for c in chained) > len(chained) // 2  # most steps took device tokens
    finally:
        await engine.stop()


async def test_stop_token_seen_a_step_late_still_ends_exactly(
    pipelined: tuple[NativeEngine, Path], hf_greedy: Greedy
) -> None:
    engine, path = pipelined
    prompt = prompt_ids(8, seed=2)
    expected = hf_greedy(path, prompt, 6)
    req = greedy_request("st", prompt, 6)
    req.stop = StopConditions(max_tokens=6, stop_token_ids=[expected[2]])
    outs = await collect(engine, req)
    assert tokens(outs) == expected[: expected.index(expected[2]) + 1]
    assert outs[-1].finish_reason == "stop"
    assert engine.pool is not None and engine.pool.num_active_blocks == 0


async def test_preemption_keeps_outputs_exact(
    tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    path = tiny_models("llama")
    engine = await small_native_engine(path, async_output=True, num_gpu_blocks=12, max_model_len=48)
    try:
        prompts = [prompt_ids(10, seed=20 + i) for i in range(3)]
        outs = await asyncio.gather(
            *(collect(engine, greedy_request(f"p{i}", p, 16)) for i, p in enumerate(prompts))
        )
        for prompt, out in zip(prompts, outs, strict=True):
            assert tokens(out) == hf_greedy(path, prompt, 16)
    finally:
        await engine.stop()


async def test_sampling_penalties_and_logprobs_equal_the_synchronous_engine(
    tiny_models: Callable[[str], Path]
) -> None:
    """Penalties make steps wait for the real tokens; logprobs and seeds come out the same."""
    path = tiny_models("llama")
    requests = [
        ("pen", prompt_ids(9, seed=11), {"repetition_penalty": 1.3, "frequency_penalty": 0.5}),
        ("lp", prompt_ids(5, seed=12), {"logprobs": 2}),
        ("seed", prompt_ids(7, seed=13), {"temperature": 1.0, "top_p": 0.9, "seed": 77}),
        ("plain", prompt_ids(12, seed=14), {}),
    ]
    results = []
    for async_output in (False, True):
        engine = await small_native_engine(path, async_output=async_output)
        try:
            outs = await asyncio.gather(*(collect(engine, greedy_request(rid, p, 8, **kw))
                                          for rid, p, kw in requests))
        finally:
            await engine.stop()
        results.append([(tokens(o), [lp for x in o for lp in (x.logprobs or [])]) for o in outs])
    assert [tokens for tokens, _ in results[0]] == [tokens for tokens, _ in results[1]]
    sync_lp, async_lp = results[0][1][1], results[1][1][1]
    assert len(async_lp) == 8 and max(abs(a - b) for a, b in zip(sync_lp, async_lp, strict=True)) < 1e-4


async def test_cancelled_mid_stream_frees_blocks(pipelined: tuple[NativeEngine, Path]) -> None:
    engine, _ = pipelined
    ctx = Context()
    outs: list[EngineOutput] = []
    async for out in engine.generate(greedy_request("c", prompt_ids(21, seed=8), 200), ctx):
        outs.append(out)
        if len(outs) == 2:
            ctx.stop_generating()
    assert outs[-1].finish_reason == "cancelled"
    await asyncio.sleep(0.05)
    assert engine.pool is not None and engine.pool.num_active_blocks == 0
    again = await collect(engine, greedy_request("after", prompt_ids(6, seed=9), 4))
    assert len(tokens(again)) == 4


async def test_kv_events_name_the_real_tokens(tiny_models: Callable[[str], Path]) -> None:
    events: list[KvEvent] = []
    hooks = EngineHooks(worker_id=7, publish_kv_events=events.extend)
    engine = await small_native_engine(tiny_models("llama"), hooks, async_output=True)
    try:
        prompt = prompt_ids(17, seed=9)
        outs = await collect(engine, greedy_request("ev", prompt, 9))
        await asyncio.sleep(0.05)
        stored = [b.block_hash for e in events if isinstance(e.data, BlocksStored)
                  for b in e.data.blocks]
        assert stored == sequence_hashes(prompt + tokens(outs), BLOCK)[: len(stored)]
        assert len(stored) == (17 + 9 - 1) // BLOCK  # the last token's KV is never computed
    finally:
        await engine.stop()


@pytest.mark.parametrize("special", [False, True])
async def test_outputs_go_to_the_loop_after_the_next_launch(
    special: bool, tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    """Greedy plain requests: a step's tokens are handed over once the next step is launched
    (the loop's wake-ups then overlap the wait for the device). With a logprobs request,
    whose launch waits for the device, they go at once, after the step's own update."""
    path = tiny_models("llama")
    engine = await small_native_engine(path, async_output=True)
    runner = engine.runner
    assert runner is not None
    order: list[str] = []
    launch, collect_step, send = runner.launch, runner.collect, engine._handover._send

    def recording_launch(*args, **kwargs):  # type: ignore[no-untyped-def]
        order.append("launch")
        return launch(*args, **kwargs)

    def recording_collect(*args, **kwargs):  # type: ignore[no-untyped-def]
        order.append("collect")
        return collect_step(*args, **kwargs)

    def recording_send(deliveries, published):  # type: ignore[no-untyped-def]
        if deliveries.plain or deliveries.full:
            order.append("send")
        send(deliveries, published)

    runner.launch = recording_launch  # type: ignore[method-assign]
    runner.collect = recording_collect  # type: ignore[method-assign]
    engine._handover._send = recording_send  # type: ignore[method-assign]
    try:
        prompt = prompt_ids(6, seed=31)
        extra = {"logprobs": 1} if special else {}
        outs = await asyncio.gather(collect(engine, greedy_request("a", prompt, 8)),
                                    collect(engine, greedy_request("b", prompt_ids(9, seed=32),
                                                                   8, **extra)))
        assert tokens(outs[0]) == hf_greedy(path, prompt, 8)
    finally:
        await engine.stop()
    before_send = [order[i - 1] for i, e in enumerate(order) if e == "send"]
    assert len(before_send) >= 6
    if special:
        assert set(before_send) == {"collect"}
    else:  # all but the last two follow a launch: at the end, a step with nothing left to
        # launch (both requests end by length with their pending token) and the engine
        # going idle send the held outputs
        assert set(before_send[:-2]) == {"launch"}
