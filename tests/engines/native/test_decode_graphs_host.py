"""The decode-graph path's host side on CPU (eager replay): staged inputs, block tables written
incrementally, async output, the greedy fast launch. Tokens must equal transformers' even
when prefix-cache commits swap a block for its twin in place and sequences are preempted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from kvflow.engines.native.cuda_graphs import DecodeGraphs
from kvflow.engines.native.runner import cdiv
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens

Greedy = Callable[[Path, list[int], int], list[int]]


async def test_graph_path_tokens_match_transformers_with_twins_and_preemption(
    tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    path = tiny_models("llama")
    # 8 sequences of up to 10 + 30 tokens need 80 blocks of 4 (40 with twins shared); 28 forces preemptions.
    engine = await small_native_engine(path, async_output=True, num_gpu_blocks=28,
                                       max_num_batched_tokens=64)
    runner = engine.runner
    assert runner is not None and engine.pool is not None and runner.graphs is None
    runner.graphs = DecodeGraphs(runner.model, runner.layout,
                                 cdiv(runner.max_model_len, runner.block_size), (1, 2, 4, 8),
                                 runner.device, runner.sampled)
    replays: list[int] = []
    swaps: list[int] = []
    replay, commit = runner.graphs.replay, engine.pool.commit

    def counting_replay(step):  # type: ignore[no-untyped-def]
        replays.append(step.batch)
        return replay(step)

    def counting_commit(block_id, *args):  # type: ignore[no-untyped-def]
        kept = commit(block_id, *args)
        swaps.append(int(kept != block_id))
        return kept

    assert engine.scheduler is not None
    preempt = engine.scheduler._preempt
    preempted: list[str] = []

    def counting_preempt(seq):  # type: ignore[no-untyped-def]
        preempted.append(seq.request_id)
        preempt(seq)

    runner.graphs.replay = counting_replay  # type: ignore[method-assign]
    engine.pool.commit = counting_commit  # type: ignore[method-assign]
    engine.scheduler._preempt = counting_preempt  # type: ignore[method-assign]
    try:
        # Pairs of equal prompts: both compute the same blocks at once, so the second commit
        # of each block finds a twin and its block id changes in place.
        prompts = [prompt_ids(n, seed=n) for n in (3, 7, 10, 5) for _ in range(2)]
        outs = await asyncio.gather(
            *(collect(engine, greedy_request(f"g{i}", p, 30)) for i, p in enumerate(prompts)))
        for prompt, out in zip(prompts, outs, strict=True):
            assert tokens(out) == hf_greedy(path, prompt, 30)
        assert preempted  # sequences were preempted and came back with new block lists
        assert len(replays) > 20 and max(replays) == 8  # the graph path served the decodes
        assert sum(swaps) > 0  # twins were swapped into rows already staged
    finally:
        await engine.stop()
