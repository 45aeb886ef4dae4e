"""NativeEngine with async output on CPU: each step launches before the last one's tokens
reach the host, and the results are exactly the synchronous engine's (and transformers')."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch

from kvflow.engines.base import EngineHooks
from kvflow.engines.native.config import NativeEngineConfig
from kvflow.engines.native.engine import NativeEngine
from kvflow.llm.kv_events import BlocksStored, KvEvent
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions
from kvflow.runtime.context import Context

BLOCK = 4
Greedy = Callable[[Path, list[int], int], list[int]]


def _prompt(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(3, 500, (n,), generator=gen)]


def _request(rid: str, prompt: list[int], max_tokens: int, **sampling: object) -> PreprocessedRequest:
    sampling.setdefault("temperature", 0.0)
    return PreprocessedRequest(
        request_id=rid, token_ids=prompt, eos_token_ids=[1],
        sampling=SamplingOptions(**sampling),  # type: ignore[arg-type]
        stop=StopConditions(max_tokens=max_tokens),
    )


async def _collect(engine: NativeEngine, req: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(req, Context())]


def _tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def _engine(path: Path, async_output: bool, hooks: EngineHooks | None = None,
                  **kw: object) -> NativeEngine:
    config = {"device": "cpu", "block_size": BLOCK, "num_gpu_blocks": 128, "max_num_seqs": 8,
              "max_num_batched_tokens": 16, "max_model_len": 256, "async_output": async_output,
              **kw}
    engine = NativeEngine(NativeEngineConfig(model_path=str(path), **config), hooks)  # type: ignore[arg-type]
    await engine.start()
    return engine


@pytest.fixture
async def pipelined(tiny_models: Callable[[str], Path]) -> AsyncIterator[tuple[NativeEngine, Path]]:
    path = tiny_models("llama")
    engine = await _engine(path, True)
    assert engine.scheduler is not None and engine.scheduler.config.async_output
    yield engine, path
    await engine.stop()


@pytest.mark.parametrize("name", ["llama", "mistral"])
async def test_chunked_and_mixed_batches_match_transformers(
    name: str, tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    """Prefill chunks share steps with decodes whose input token is still on the device."""
    path = tiny_models(name)
    engine = await _engine(path, True)
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
        prompts = [_prompt(n, seed=n) for n in (1, 6, 19, 37)]
        outs = await asyncio.gather(
            *(_collect(engine, _request(f"r{i}", p, 10)) for i, p in enumerate(prompts))
        )
        for prompt, out in zip(prompts, outs, strict=True):
            assert _tokens(out) == hf_greedy(path, prompt, 10)
        assert sum(c > 0 for c in chained) > len(chained) // 2  # most steps took device tokens
    finally:
        await engine.stop()


async def test_stop_token_seen_a_step_late_still_ends_exactly(
    pipelined: tuple[NativeEngine, Path], hf_greedy: Greedy
) -> None:
    engine, path = pipelined
    prompt = _prompt(8, seed=2)
    expected = hf_greedy(path, prompt, 6)
    req = _request("st", prompt, 6)
    req.stop = StopConditions(max_tokens=6, stop_token_ids=[expected[2]])
    outs = await _collect(engine, req)
    assert _tokens(outs) == expected[: expected.index(expected[2]) + 1]
    assert outs[-1].finish_reason == "stop"
    assert engine.pool is not None and engine.pool.num_active_blocks == 0


async def test_preemption_keeps_outputs_exact(
    tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    path = tiny_models("llama")
    engine = await _engine(path, True, num_gpu_blocks=12, max_model_len=48)
    try:
        prompts = [_prompt(10, seed=20 + i) for i in range(3)]
        outs = await asyncio.gather(
            *(_collect(engine, _request(f"p{i}", p, 16)) for i, p in enumerate(prompts))
        )
        for prompt, out in zip(prompts, outs, strict=True):
            assert _tokens(out) == hf_greedy(path, prompt, 16)
    finally:
        await engine.stop()


async def test_sampling_penalties_and_logprobs_equal_the_synchronous_engine(
    tiny_models: Callable[[str], Path]
) -> None:
    """Penalties make steps wait for the real tokens; logprobs and seeds come out the same."""
    path = tiny_models("llama")
    requests = [
        ("pen", _prompt(9, seed=11), {"repetition_penalty": 1.3, "frequency_penalty": 0.5}),
        ("lp", _prompt(5, seed=12), {"logprobs": 2}),
        ("seed", _prompt(7, seed=13), {"temperature": 1.0, "top_p": 0.9, "seed": 77}),
        ("plain", _prompt(12, seed=14), {}),
    ]
    results = []
    for async_output in (False, True):
        engine = await _engine(path, async_output)
        try:
            outs = await asyncio.gather(*(_collect(engine, _request(rid, p, 8, **kw))
                                          for rid, p, kw in requests))
        finally:
            await engine.stop()
        results.append([(_tokens(o), [lp for x in o for lp in (x.logprobs or [])]) for o in outs])
    assert [tokens for tokens, _ in results[0]] == [tokens for tokens, _ in results[1]]
    sync_lp, async_lp = results[0][1][1], results[1][1][1]
    assert len(async_lp) == 8 and max(abs(a - b) for a, b in zip(sync_lp, async_lp, strict=True)) < 1e-4


async def test_cancelled_mid_stream_frees_blocks(pipelined: tuple[NativeEngine, Path]) -> None:
    engine, _ = pipelined
    ctx = Context()
    outs: list[EngineOutput] = []
    async for out in engine.generate(_request("c", _prompt(21, seed=8), 200), ctx):
        outs.append(out)
        if len(outs) == 2:
            ctx.stop_generating()
    assert outs[-1].finish_reason == "cancelled"
    await asyncio.sleep(0.05)
    assert engine.pool is not None and engine.pool.num_active_blocks == 0
    again = await _collect(engine, _request("after", _prompt(6, seed=9), 4))
    assert len(_tokens(again)) == 4


async def test_kv_events_name_the_real_tokens(tiny_models: Callable[[str], Path]) -> None:
    events: list[KvEvent] = []
    hooks = EngineHooks(worker_id=7, publish_kv_events=events.extend)
    engine = await _engine(tiny_models("llama"), True, hooks)
    try:
        prompt = _prompt(17, seed=9)
        outs = await _collect(engine, _request("ev", prompt, 9))
        await asyncio.sleep(0.05)
        stored = [b.block_hash for e in events if isinstance(e.data, BlocksStored)
                  for b in e.data.blocks]
        assert stored == sequence_hashes(prompt + _tokens(outs), BLOCK)[: len(stored)]
        assert len(stored) == (17 + 9 - 1) // BLOCK  # the last token's KV is never computed
    finally:
        await engine.stop()
