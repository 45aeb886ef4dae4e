"""On CUDA: --batch-invariant gives identical tokens alone/together/chunked; the first request
after startup waits for no compile; cuDNN's long-prompt plans are built on the thread that
serves. Opt-in: -m gpu."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvflow.engines.native.config import NativeEngineConfig
from kvflow.engines.native.engine import NativeEngine
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


async def _engine(path: Path, **kw: object) -> NativeEngine:
    config = {"device": "cuda", "block_size": 16, "num_gpu_blocks": 2048, "max_num_seqs": 64,
              "max_num_batched_tokens": 4096, "max_model_len": 512, **kw}
    engine = NativeEngine(NativeEngineConfig(model_path=str(path), **config))  # type: ignore[arg-type]
    await engine.start()
    return engine


async def _run(path: Path, prompts: list[list[int]], together: bool, budget: int,
               eager: bool = False) -> list:
    engine = await _engine(path, batch_invariant=True, max_num_batched_tokens=budget,
                           enforce_eager=eager)
    try:
        assert (engine.runner.graphs is None) == eager  # decode steps replay graphs unless eager
        reqs = [greedy_request(f"r{i}", p, 16, logprobs=1) for i, p in enumerate(prompts)]
        if together:
            outs = await asyncio.gather(*(collect(engine, r) for r in reqs))
        else:
            outs = [await collect(engine, r) for r in reqs]
        return [(tokens(o), [lp for x in o for lp in (x.logprobs or [])]) for o in outs]
    finally:
        await engine.stop()


@pytest.mark.parametrize("name", ["llama_bf16", "mistral"])
async def test_cuda_batch_invariant_64_prompts(name: str, tiny_models: Callable[[str], Path]) -> None:
    path = tiny_models(name)
    prompts = [prompt_ids(5 + 7 * i, seed=i) for i in range(64)]
    alone = await _run(path, prompts, together=False, budget=4096)
    assert await _run(path, prompts, together=True, budget=4096) == alone
    assert await _run(path, prompts, together=True, budget=64) == alone  # chunked and mixed
    # a graph replays the kernels an eager step runs, on the same shapes
    assert await _run(path, prompts, together=True, budget=4096, eager=True) == alone


async def test_cuda_first_request_waits_for_no_compile(tiny_models: Callable[[str], Path]) -> None:
    engine = await _engine(tiny_models("llama_bf16"))
    try:
        ttfts = []
        for i in range(10):
            start = time.perf_counter()
            await collect(engine, greedy_request(f"t{i}", prompt_ids(300, seed=50 + i), 1))
            ttfts.append(time.perf_counter() - start)
        assert ttfts[0] < 2 * ttfts[-1] + 0.005, ttfts  # 5 ms of slack for timer noise
        # then other shapes: prompt lengths either side of 16-multiples and tiling switches,
        # batches of several sizes, sampled with logprobs — none may compile on the way
        reqs = [greedy_request(f"m{n}", prompt_ids(n, seed=n), 4) for n in (7, 64, 65, 500, 505)]
        reqs.append(greedy_request("s", prompt_ids(33, seed=3), 4, temperature=0.8, top_p=0.9,
                                   logprobs=2))
        await asyncio.gather(*(collect(engine, r) for r in reqs))
        for batch in (3, 17, 48):
            await asyncio.gather(*(collect(engine, greedy_request(f"b{batch}-{i}", prompt_ids(
                40 + i, seed=batch + i), 8)) for i in range(batch)))
        assert engine.compile_watch.armed
        assert engine.compile_watch.compiles == []
    finally:
        await engine.stop()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                    reason="the cuDNN prefill path is enabled on sm_90 (where it was measured)")
async def test_cuda_long_prompt_plans_are_built_on_the_serving_thread(
        tiny_models: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch keeps cuDNN's plans per thread: the warm-up that builds them must run on the
    engine thread, which then serves a long fresh prompt through cuDNN."""
    from kvflow.engines.native import triton_attention as ta

    warmed: list[tuple[str, tuple[int, ...]]] = []
    dense_calls: list[tuple[str, int, int]] = []
    real_warm_up, real_call = ta.TritonPagedBackend.warm_up, ta.DensePrefill.__call__

    def warm_up(self: ta.TritonPagedBackend, *args: object) -> tuple[int, ...]:
        lengths = real_warm_up(self, *args)  # type: ignore[arg-type]
        warmed.append((threading.current_thread().name, lengths))
        return lengths

    def call(self: ta.DensePrefill, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             rows: int, scale: float) -> torch.Tensor | None:
        dense_calls.append((threading.current_thread().name, rows, q.shape[0]))
        return real_call(self, q, k, v, rows, scale)

    monkeypatch.setattr(ta.TritonPagedBackend, "warm_up", warm_up)
    monkeypatch.setattr(ta.DensePrefill, "__call__", call)
    engine = await _engine(tiny_models("llama_bf16_long"), max_num_batched_tokens=5000,
                           max_model_len=6000)
    try:
        assert warmed == [("native-engine", (4096, 4608, 5120))]
        for n in (4500, 4608):  # lengths off and on a multiple of 16 (Triton's int keys)
            out = await collect(engine, greedy_request(f"long{n}", prompt_ids(n, seed=n), 2))
            assert len(tokens(out)) == 2
            assert ("native-engine", n, 4608) in dense_calls  # padded to a warmed plan's length
        assert engine.compile_watch.compiles == []
    finally:
        await engine.stop()
