"""The echo engine: prompt tokens back one per step; --echo-repeat cycles them to max_tokens."""

from __future__ import annotations

import asyncio

import pytest

from kvflow.engines.base import EngineHooks, get_engine
from kvflow.engines.echo import EchoConfig, EchoEngine
from kvflow.engines.worker import parse_args
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest, StopConditions
from kvflow.runtime.context import Context


def request(ids: list[int], max_tokens: int | None) -> PreprocessedRequest:
    return PreprocessedRequest("r", ids, stop=StopConditions(max_tokens=max_tokens))


async def collect(engine: EchoEngine, req: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(req, Context())]


@pytest.mark.parametrize(
    "repeat,ids,max_tokens,tokens,finish",
    [
        (False, [1, 2, 3], None, [1, 2, 3], "stop"),
        (False, [1, 2, 3], 2, [1, 2], "length"),
        (False, [1, 2, 3], 3, [1, 2, 3], "stop"),  # the prompt ran out first
        (False, [1, 2, 3], 5, [1, 2, 3], "stop"),
        (True, [1, 2, 3], 7, [1, 2, 3, 1, 2, 3, 1], "length"),
        (True, [1, 2, 3], 3, [1, 2, 3], "length"),
        (True, [1, 2, 3], None, [1, 2, 3], "stop"),  # nothing to repeat up to
    ],
)
async def test_tokens_and_finish_reason(repeat, ids, max_tokens, tokens, finish) -> None:
    engine = EchoEngine(EchoConfig(repeat=repeat), EngineHooks())
    outs = await collect(engine, request(ids, max_tokens))
    assert [t for o in outs for t in o.token_ids] == tokens
    assert [o.finish_reason for o in outs] == [None] * (len(tokens) - 1) + [finish]
    assert outs[0].cached_tokens == 0


async def test_empty_prompt_ends_at_once() -> None:
    engine = EchoEngine(EchoConfig(repeat=True), EngineHooks())
    outs = await collect(engine, request([], 4))
    assert len(outs) == 1 and outs[0].token_ids == [] and outs[0].finish_reason == "stop"


async def test_zero_delay_requests_interleave() -> None:
    """One token per loop turn, as a batched engine's steps would hand them out."""
    engine = EchoEngine(EchoConfig(repeat=True), EngineHooks())
    order: list[str] = []

    async def run(name: str) -> None:
        async for _ in engine.generate(request([1], 4), Context()):
            order.append(name)

    await asyncio.gather(run("a"), run("b"))
    assert order == ["a", "b"] * 4


async def test_stop_ends_with_cancelled() -> None:
    engine = EchoEngine(EchoConfig(repeat=True), EngineHooks())
    ctx = Context()
    outs = []
    async for out in engine.generate(request([1, 2], 100), ctx):
        outs.append(out)
        if len(outs) == 3:
            ctx.stop_generating()
    assert len(outs) == 4 and outs[-1].finish_reason == "cancelled"


def test_cli_flag_builds_a_repeating_engine() -> None:
    ns = parse_args(["--engine", "echo", "--model-path", "x", "--echo-repeat"])
    engine = get_engine("echo").build(ns, EngineHooks())
    assert isinstance(engine, EchoEngine) and engine.config == EchoConfig(repeat=True)


def test_chat_prompts_echo_their_last_message(tmp_path) -> None:
    from kvflow.engines.echo import LastMessage
    from kvflow.llm.tokenizer import Tokenizer
    from kvflow.testing.tokenizer import make_model_dir

    tok = Tokenizer.from_dir(make_model_dir(tmp_path / "tiny"))
    reply = LastMessage(tok)
    for prompt, want in [
        ("<|im_start|>user\nhello kvflow<|im_end|>\n<|im_start|>assistant\n", "hello kvflow"),
        ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nline one\nline two<|im_end|>\n"
         "<|im_start|>assistant\n", "line one\nline two"),
        ("a plain completion prompt", "a plain completion prompt"),
    ]:
        assert tok.decode(reply(tok.encode(prompt))) == want
