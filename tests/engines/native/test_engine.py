"""NativeEngine end to end on CPU: token-for-token equality with transformers, caching, preemption, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch

from kvflow.engines.base import EngineHooks
from kvflow.engines.native.config import NativeEngineConfig
from kvflow.engines.native.engine import NativeEngine
from kvflow.llm.kv_events import BlocksStored, KvEvent, LoadMetrics
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


async def _collect(engine: NativeEngine, req: PreprocessedRequest,
                   ctx: Context | None = None) -> list[EngineOutput]:
    return [out async for out in engine.generate(req, ctx or Context())]


def _tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def _engine(path: Path, hooks: EngineHooks | None = None, **kw: object) -> NativeEngine:
    config = {"device": "cpu", "block_size": BLOCK, "num_gpu_blocks": 128, "max_num_seqs": 8,
              "max_num_batched_tokens": 16, "max_model_len": 256, **kw}
    engine = NativeEngine(NativeEngineConfig(model_path=str(path), **config), hooks)  # type: ignore[arg-type]
    await engine.start()
    return engine


@pytest.fixture
async def llama(tiny_models: Callable[[str], Path]) -> AsyncIterator[tuple[NativeEngine, Path]]:
    path = tiny_models("llama")
    engine = await _engine(path)
    yield engine, path
    await engine.stop()


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral"])
async def test_greedy_batch_matches_transformers_generate(
    name: str, tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    path = tiny_models(name)
    engine = await _engine(path)  # budget 16 tokens/step: prompts are chunked and mixed
    try:
        prompts = [_prompt(n, seed=n) for n in (1, 6, 19, 37)]
        outs = await asyncio.gather(
            *(_collect(engine, _request(f"r{i}", p, 10)) for i, p in enumerate(prompts))
        )
        for prompt, out in zip(prompts, outs, strict=True):
            assert _tokens(out) == hf_greedy(path, prompt, 10)
            assert out[-1].finish_reason in ("length", "stop")
    finally:
        await engine.stop()


async def test_prefix_cache_hit_reports_cached_tokens_and_still_matches(
    llama: tuple[NativeEngine, Path], hf_greedy: Greedy
) -> None:
    engine, path = llama
    shared = _prompt(14, seed=3)
    first = await _collect(engine, _request("a", shared, 4))
    assert first[0].cached_tokens == 0
    second_prompt = shared + _prompt(5, seed=4)
    second = await _collect(engine, _request("b", second_prompt, 8))
    assert second[0].cached_tokens == 12  # three full blocks of the shared prefix
    assert _tokens(second) == hf_greedy(path, second_prompt, 8)


async def test_preemption_by_recompute_keeps_outputs_exact(
    tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    path = tiny_models("llama")
    engine = await _engine(path, num_gpu_blocks=12, max_model_len=48)  # 48 tokens for 3 x 26
    assert engine.scheduler is not None
    preempted: list[str] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():  # type: ignore[no-untyped-def]
        out = schedule()
        preempted.extend(s.request_id for s in out.preempted)
        return out

    engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    try:
        prompts = [_prompt(10, seed=20 + i) for i in range(3)]
        outs = await asyncio.gather(
            *(_collect(engine, _request(f"p{i}", p, 16)) for i, p in enumerate(prompts))
        )
        assert preempted, "the pool was meant to run out and force a preemption"
        for prompt, out in zip(prompts, outs, strict=True):
            assert _tokens(out) == hf_greedy(path, prompt, 16)
    finally:
        await engine.stop()


async def test_logprobs_match_transformers_log_softmax(
    llama: tuple[NativeEngine, Path], hf_model: Callable[[Path], object]
) -> None:
    engine, path = llama
    prompt = _prompt(9, seed=5)
    outs = await _collect(engine, _request("lp", prompt, 6, logprobs=3))
    tokens = _tokens(outs)
    logprobs = [lp for o in outs for lp in (o.logprobs or [])]
    tops = [t for o in outs for t in (o.top_logprobs or [])]
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt + tokens])).logits[0]  # type: ignore[operator]
    ref = torch.log_softmax(logits.float(), -1)[len(prompt) - 1 : -1]
    assert len(logprobs) == len(tokens) == len(tops) == 6
    for i, token in enumerate(tokens):
        assert abs(logprobs[i] - ref[i, token].item()) < 1e-4  # stated tolerance: 1e-4 nats
        assert [t.token_id for t in tops[i]] == ref[i].topk(3).indices.tolist()


async def test_seeded_sampling_is_reproducible(llama: tuple[NativeEngine, Path]) -> None:
    engine, _ = llama
    prompt = _prompt(7, seed=6)

    def req(rid: str, seed: int) -> PreprocessedRequest:
        return _request(rid, prompt, 12, temperature=1.0, top_p=0.9, seed=seed)

    alone = _tokens(await _collect(engine, req("s1", 1234)))
    crowd = await asyncio.gather(
        _collect(engine, req("s2", 1234)),
        _collect(engine, req("s3", 99)),
        _collect(engine, _request("s4", _prompt(30, seed=7), 12, temperature=1.0)),
    )
    assert _tokens(crowd[0]) == alone
    assert _tokens(crowd[1]) != alone


async def test_cancellation_frees_blocks_at_once(llama: tuple[NativeEngine, Path]) -> None:
    engine, _ = llama
    assert engine.pool is not None
    ctx = Context()
    outs: list[EngineOutput] = []
    async for out in engine.generate(_request("c", _prompt(21, seed=8), 200), ctx):
        outs.append(out)
        if len(outs) == 2:
            assert engine.pool.num_active_blocks > 0
            ctx.stop_generating()
            assert engine.pool.num_active_blocks == 0  # freed before the next step
    assert outs[-1].finish_reason == "cancelled"
    assert len(_tokens(outs)) < 200


async def test_stop_token_and_min_tokens(llama: tuple[NativeEngine, Path], hf_greedy: Greedy) -> None:
    engine, path = llama
    prompt = _prompt(8, seed=2)
    expected = hf_greedy(path, prompt, 6)
    stop_at = expected[2]
    req = _request("st", prompt, 6)
    req.stop = StopConditions(max_tokens=6, stop_token_ids=[stop_at])
    outs = await _collect(engine, req)
    assert _tokens(outs) == expected[: expected.index(stop_at) + 1]
    assert outs[-1].finish_reason == "stop"


async def test_kv_events_and_load_metrics_are_published(tiny_models: Callable[[str], Path]) -> None:
    events: list[KvEvent] = []
    loads: list[LoadMetrics] = []
    hooks = EngineHooks(worker_id=7, publish_kv_events=events.extend, publish_load=loads.append)
    engine = await _engine(tiny_models("llama"), hooks)
    try:
        prompt = _prompt(17, seed=9)
        outs = await _collect(engine, _request("ev", prompt, 5))
        await asyncio.sleep(0.05)  # the idle load report comes after the last step
        stored = [b.block_hash for e in events if isinstance(e.data, BlocksStored)
                  for b in e.data.blocks]
        full = sequence_hashes(prompt + _tokens(outs), BLOCK)
        assert stored == full[: len(stored)] and len(stored) >= 4
        assert all(e.worker_id == 7 for e in events)
        assert loads and loads[-1].num_running == 0 and loads[-1].total_blocks == 128
        snapshot = engine.cache_snapshot()
        assert snapshot is not None and [b.block_hash for b in snapshot.blocks] == stored
    finally:
        await engine.stop()


async def test_bad_requests_fail_with_a_clear_error(llama: tuple[NativeEngine, Path]) -> None:
    engine, _ = llama
    outs = await _collect(engine, _request("bad", [5, 100000], 3))
    assert outs[-1].finish_reason == "error" and "vocabulary" in (outs[-1].error or "")
    outs = await _collect(engine, _request("long", _prompt(300, seed=1), 3))
    assert outs[-1].finish_reason == "error" and "context" in (outs[-1].error or "")
