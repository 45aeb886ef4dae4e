"""RequestStream on its own (outputs gathered per stream interval) and many concurrent
streams through the engine, each receiving exactly its own tokens in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from kvflow.engines.core.outputs import follow_outputs
from kvflow.engines.native.stream import Delivery, RequestStream
from kvflow.llm.protocol import EngineOutput, TopLogprob
from kvflow.runtime.context import Context
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens

Greedy = Callable[[Path, list[int], int], list[int]]


async def _settle() -> None:
    """Let every woken generator run (each wake-up takes a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _consumer(stream: RequestStream, outs: list[EngineOutput]) -> asyncio.Task[None]:
    """A task collecting the stream's outputs into `outs`, started and settled."""

    async def consume() -> None:
        async for out in follow_outputs(stream, lambda: None, Context()):
            outs.append(out)

    task = asyncio.create_task(consume())
    await _settle()
    return task


async def _drive(stream: RequestStream, steps: list[list[int]], reason: str = "length") -> list[EngineOutput]:
    """Push one step's tokens at a time, letting the consumer keep up; then finish."""
    outs: list[EngineOutput] = []
    task = await _consumer(stream, outs)
    for new in steps:
        stream.push_tokens(new)
        await _settle()
    stream.finish(reason)
    await task
    return outs


async def test_interval_one_gives_an_output_per_step() -> None:
    outs = await _drive(RequestStream("r", False), [[5], [6], [7]])
    assert [o.token_ids for o in outs] == [[5], [6], [7], []]
    assert outs[0].cached_tokens == 0 and outs[1].cached_tokens is None
    assert outs[-1].finish_reason == "length"


async def test_interval_gathers_tokens_after_the_first_output() -> None:
    outs = await _drive(RequestStream("r", False, interval=3), [[t] for t in range(10, 18)])
    # the first token at once (time to first token), then 3 at a time, the rest with the finish
    assert [o.token_ids for o in outs] == [[10], [11, 12, 13], [14, 15, 16], [17]]
    assert [o.finish_reason for o in outs] == [None, None, None, "length"]
    assert outs[0].cached_tokens == 0


async def test_a_phase_shifts_the_second_output() -> None:
    """Streams that start together wake on different steps: the second output comes after
    `phase` tokens, then every `interval`."""
    steps = [[t] for t in range(10, 18)]
    early = await _drive(RequestStream("a", False, interval=3, phase=1), steps)
    late = await _drive(RequestStream("b", False, interval=3, phase=2), steps)
    assert [o.token_ids for o in early] == [[10], [11], [12, 13, 14], [15, 16, 17], []]
    assert [o.token_ids for o in late] == [[10], [11, 12], [13, 14, 15], [16, 17]]
    with pytest.raises(ValueError, match="phase 4"):
        RequestStream("c", False, interval=3, phase=4)


async def test_interval_keeps_logprobs_with_their_tokens() -> None:
    stream = RequestStream("r", True, interval=2)
    outs: list[EngineOutput] = []
    task = await _consumer(stream, outs)
    for t in range(4):
        stream.push(Delivery(stream, [t], logprobs=[-float(t)],
                             top_logprobs=[[TopLogprob(t, -float(t))]]))
        await _settle()
    stream.push(Delivery(stream, [9], logprobs=[-9.0], top_logprobs=[[]], finish_reason="stop"))
    await task
    assert [o.token_ids for o in outs] == [[0], [1, 2], [3, 9]]
    assert [o.logprobs for o in outs] == [[-0.0], [-1.0, -2.0], [-3.0, -9.0]]
    assert [len(o.top_logprobs or []) for o in outs] == [1, 2, 2]
    assert outs[-1].finish_reason == "stop"


async def test_an_error_is_not_held_back() -> None:
    stream = RequestStream("r", False, interval=8)
    outs: list[EngineOutput] = []
    task = await _consumer(stream, outs)
    stream.push_tokens([4])
    await _settle()
    stream.push_tokens([5])  # held back (interval 8) until the failure
    await _settle()
    stream.fail("boom")
    await task
    assert [o.token_ids for o in outs] == [[4], [5]]
    assert (outs[-1].finish_reason, outs[-1].error) == ("error", "boom")


@pytest.mark.parametrize("interval", [1, 4])
async def test_many_concurrent_streams_each_get_their_tokens_in_order(
    interval: int, tiny_models: Callable[[str], Path], hf_greedy: Greedy
) -> None:
    """32 requests decoding together with async output: every stream's tokens are its own
    prompt's greedy continuation, whatever the interval; with an interval every output
    after the second (which waits for the stream's phase) and before the last carries at
    least that many tokens."""
    path = tiny_models("llama")
    engine = await small_native_engine(path, async_output=True, max_num_seqs=32,
                                       max_num_batched_tokens=256, num_gpu_blocks=512,
                                       stream_interval=interval)
    try:
        prompts = [prompt_ids(3 + i % 7, seed=100 + i) for i in range(32)]
        outs = await asyncio.gather(
            *(collect(engine, greedy_request(f"s{i}", p, 12)) for i, p in enumerate(prompts)))
    finally:
        await engine.stop()
    for prompt, out in zip(prompts, outs, strict=True):
        assert tokens(out) == hf_greedy(path, prompt, 12)
        assert out[-1].finish_reason in ("length", "stop")
        assert all(len(o.token_ids) >= interval for o in out[2:-1])
        if interval > 1 and len(tokens(out)) == 12:
            assert len(out) <= 3 + 10 // interval  # first, second, full outputs, the rest


def test_a_bad_interval_is_refused() -> None:
    from kvflow.engines.native.config import NativeEngineConfig

    with pytest.raises(ValueError, match="--stream-interval must be >= 1"):
        NativeEngineConfig(model_path="/m", stream_interval=0)
