"""The native engine on CUDA (Triton paged attention, CUDA graphs) against transformers. Opt-in: -m gpu."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvflow.engines.native.config import NativeEngineConfig
from kvflow.engines.native.engine import NativeEngine
from kvflow.llm.protocol import PreprocessedRequest, SamplingOptions, StopConditions
from kvflow.runtime.context import Context

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
Greedy = Callable[[Path, list[int], int], list[int]]


def _prompt(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(3, 500, (n,), generator=gen)]


async def _generate(engine: NativeEngine, rid: str, prompt: list[int], n: int,
                    **sampling: object) -> list[int]:
    req = PreprocessedRequest(
        request_id=rid, token_ids=prompt, eos_token_ids=[1],
        sampling=SamplingOptions(**{"temperature": 0.0, **sampling}),  # type: ignore[arg-type]
        stop=StopConditions(max_tokens=n),
    )
    return [t async for out in engine.generate(req, Context()) for t in out.token_ids]


async def _engine(path: Path, **kw: object) -> NativeEngine:
    config = {"device": "cuda", "block_size": 16, "num_gpu_blocks": 256, "max_num_seqs": 16,
              "max_num_batched_tokens": 64, "max_model_len": 512, **kw}
    engine = NativeEngine(NativeEngineConfig(model_path=str(path), **config))  # type: ignore[arg-type]
    await engine.start()
    return engine


@pytest.mark.parametrize("eager", [False, True], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral"])
async def test_cuda_greedy_batch_matches_transformers(
    name: str, eager: bool, tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    path = tiny_models(name)
    engine = await _engine(path, enforce_eager=eager)
    try:
        assert (engine.runner.graphs is None) == eager  # type: ignore[union-attr]
        assert engine.scheduler.config.async_output != eager  # type: ignore[union-attr]
        prompts = [_prompt(n, seed=n) for n in (1, 9, 40, 130)]  # chunked: 64-token budget
        outs = await asyncio.gather(
            *(_generate(engine, f"g{i}", p, 12) for i, p in enumerate(prompts))
        )
        for prompt, out in zip(prompts, outs, strict=True):
            assert out == hf_greedy(path, prompt, 12)
    finally:
        await engine.stop()


async def test_cuda_prefix_hit_and_preemption(
    tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    path = tiny_models("llama")
    engine = await _engine(path, num_gpu_blocks=9, max_model_len=144)
    try:
        shared = _prompt(40, seed=1)
        await _generate(engine, "warm", shared, 2)
        prompts = [shared + _prompt(5 + i, seed=10 + i) for i in range(3)]
        outs = await asyncio.gather(*(_generate(engine, f"p{i}", p, 24)
                                      for i, p in enumerate(prompts)))
        for prompt, out in zip(prompts, outs, strict=True):
            assert out == hf_greedy(path, prompt, 24)
    finally:
        await engine.stop()


async def test_cuda_bf16_logprobs_close_to_transformers(
    tiny_models: Callable[[str], Path], hf_model: Callable[[Path], object]
) -> None:
    path = tiny_models("llama_bf16")
    engine = await _engine(path)
    try:
        prompt = _prompt(33, seed=4)
        req = PreprocessedRequest(
            request_id="lp", token_ids=prompt,
            sampling=SamplingOptions(temperature=0.0, logprobs=1),
            stop=StopConditions(max_tokens=1),
        )
        outs = [o async for o in engine.generate(req, Context())]
        token, logprob = outs[0].token_ids[0], outs[0].logprobs[0]  # type: ignore[index]
        with torch.no_grad():
            ref = hf_model(path)(torch.tensor([prompt])).logits[0, -1].float()  # type: ignore[operator]
        assert abs(logprob - torch.log_softmax(ref, -1)[token].item()) < 0.1  # bf16 tolerance
    finally:
        await engine.stop()


async def test_cuda_graph_async_sampling_equals_eager(tiny_models: Callable[[str], Path]) -> None:
    """Penalties (steps wait for real tokens), logprobs, seeds and greedy rows in one batch:
    the graph + async output engine gives the eager synchronous engine's tokens."""
    path = tiny_models("llama")
    requests = [
        ("pen", _prompt(9, seed=11), {"repetition_penalty": 1.3, "frequency_penalty": 0.5}),
        ("lp", _prompt(5, seed=12), {"logprobs": 2}),
        ("seed", _prompt(7, seed=13), {"temperature": 1.0, "top_p": 0.9, "seed": 77}),
        ("plain", _prompt(12, seed=14), {}),
        ("plain2", _prompt(30, seed=15), {}),
    ]
    results = []
    for eager in (True, False):
        engine = await _engine(path, enforce_eager=eager)
        try:
            results.append(await asyncio.gather(
                *(_generate(engine, rid, p, 16, **kw) for rid, p, kw in requests)))
        finally:
            await engine.stop()
    assert results[0] == results[1]


def test_graph_inputs_staged_like_build_inputs() -> None:
    """The pinned-buffer upload of a decode step equals the generic tensors; padding rows pad."""
    from kvflow.engines.core import Sequence, StopRule
    from kvflow.engines.core.scheduler import ScheduledSeq
    from kvflow.engines.native.cuda_graphs import _Inputs
    from kvflow.engines.native.inputs import build_inputs
    from kvflow.engines.native.kv_cache import KvCacheLayout

    layout = KvCacheLayout(100, 4, 2, 2, 8, torch.float32)
    staged = _Inputs(8, 10, layout, torch.device("cuda"))
    scheduled = []
    for i, n in enumerate([5, 13, 9]):
        seq = Sequence(f"r{i}", list(range(100 + i, 100 + i + n)), StopRule(max_tokens=3))
        seq.block_ids = [(7 * i + j) % 100 for j in range((n + 3) // 4)]
        scheduled.append(ScheduledSeq(seq, 1, n - 1, False, True))
    for size in (8, 4):
        staged.write(scheduled, size, {})
        ref = build_inputs(scheduled, 4, torch.device("cuda"))
        assert torch.equal(staged.longs[0, :3], ref.input_ids)
        assert torch.equal(staged.longs[1, :3], ref.positions)
        assert torch.equal(staged.longs[2, :size], torch.cat(
            [ref.meta.slot_mapping, torch.full((size - 3,), layout.pad_slot, device="cuda")]))
        assert staged.ints[:size].tolist() == [5, 13, 9] + [1] * (size - 3)
        for i, s in enumerate(scheduled):
            n = len(s.seq.block_ids)
            assert torch.equal(staged.block_tables()[i, :n], ref.meta.block_tables[i, :n])
        assert (staged.block_tables()[3:size, 0] == layout.pad_block).all()
        assert (staged.longs[3, :size] == -1).all()
    pending = scheduled[1].seq  # its last token still on the device: row 5 of the last step
    pending.token_ids.pop()
    pending.num_placeholders = 1
    staged.write(scheduled, 4, {pending: 5})
    assert staged.longs[3, :4].tolist() == [-1, 5, -1, -1] and staged.longs[0, 1] == 0
    sampled = torch.arange(100, 108, device="cuda")
    ids = staged.longs[0, :4].clone()
    from kvflow.engines.native.ops import make_ops

    for ops in ("torch", "triton"):
        chained = ids.clone()
        make_ops(ops, torch.device("cuda")).chain_ids(chained, staged.longs[3, :4], sampled)
        assert chained.tolist() == [ids[0].item(), 105, ids[2].item(), ids[3].item()]
