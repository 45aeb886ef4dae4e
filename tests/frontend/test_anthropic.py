"""POST /v1/messages and /v1/messages/count_tokens through the official `anthropic` client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import pytest

from kvflow.frontend.anthropic_request import split_system, to_chat
from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.testing import (
    EchoEngineClient,
    ScriptedEngineClient,
    Served,
    raw_request,
    start_served,
    tokens_script,
)
from kvflow.llm import anthropic as an
from kvflow.llm.protocol import EngineOutput

MODEL = "test-model"
KEY = "sk-test"
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL_TEXT = ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
             "</tool_call>")


@pytest.fixture
async def keyed() -> AsyncIterator[Served]:
    s = await start_served(FrontendConfig(port=0, api_keys=(KEY,)), api_key=KEY)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def client(keyed: Served) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = anthropic.AsyncAnthropic(base_url=keyed.base_url, api_key=KEY, max_retries=0)
    try:
        yield c
    finally:
        await c.close()


def script(keyed: Served, make_card, tokenizer, text: str, **card_kw) -> ScriptedEngineClient:
    engine = ScriptedEngineClient(tokens_script(tokenizer.encode(text)))
    keyed.add(make_card(**card_kw), engine)
    return engine


async def test_text_message(keyed, client, make_card, tokenizer):
    engine = script(keyed, make_card, tokenizer, "Hello there")
    msg = await client.messages.create(
        model=MODEL, max_tokens=32, system="Be brief.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert msg.id.startswith("msg_") and msg.role == "assistant" and msg.type == "message"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello there"
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens == len(tokenizer.encode("Hello there"))
    assert msg.usage.input_tokens == len(engine.requests[-1].token_ids)
    prompt = tokenizer.decode(engine.requests[-1].token_ids, skip_special_tokens=False)
    assert "Be brief." in prompt and "hi" in prompt
    assert engine.requests[-1].stop.max_tokens == 32


async def test_streaming_events_in_anthropic_order(keyed, client, make_card, tokenizer):
    script(keyed, make_card, tokenizer, "Hello there")
    async with client.messages.stream(
        model=MODEL, max_tokens=32, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    raw = [k for k in kinds if k not in ("text",)]  # the helper adds "text" convenience events
    assert raw[0] == "message_start" and raw[1] == "content_block_start"
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}
    assert final.content[0].text == "Hello there"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(tokenizer.encode("Hello there"))


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use(keyed, client, make_card, tokenizer, stream):
    script(keyed, make_card, tokenizer, CALL_TEXT, tool_call_parser="hermes")
    args = dict(model=MODEL, max_tokens=64, tools=[WEATHER],
                messages=[{"role": "user", "content": "Weather in Paris?"}])
    if stream:
        async with client.messages.stream(**args) as s:
            msg = await s.get_final_message()
    else:
        msg = await client.messages.create(**args)
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[0].text == "Let me check."
    call = msg.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    assert msg.stop_reason == "tool_use"


async def test_tool_history_renders(keyed, client, make_card, tokenizer):
    engine = script(keyed, make_card, tokenizer, "Sunny.", tool_call_parser="hermes")
    msg = await client.messages.create(model=MODEL, max_tokens=16, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21C"}]},
    ])
    assert msg.content[0].text == "Sunny."
    prompt = tokenizer.decode(engine.requests[-1].token_ids, skip_special_tokens=False)
    assert "sunny, 21C" in prompt and '"city": "Paris"' in prompt


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequence(keyed, client, make_card, tokenizer, stream):
    script(keyed, make_card, tokenizer, "Hello STOP world")
    args = dict(model=MODEL, max_tokens=32, stop_sequences=["STOP"],
                messages=[{"role": "user", "content": "hi"}])
    if stream:
        async with client.messages.stream(**args) as s:
            msg = await s.get_final_message()
    else:
        msg = await client.messages.create(**args)
    assert msg.content[0].text == "Hello "
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "STOP")


async def test_max_tokens_stop_reason(keyed, client, card):
    keyed.add(card, EchoEngineClient(repeat=True))
    msg = await client.messages.create(model=MODEL, max_tokens=3,
                                       messages=[{"role": "user", "content": "hello world"}])
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3


async def test_reasoning_becomes_a_thinking_block(keyed, client, make_card, tokenizer):
    script(keyed, make_card, tokenizer, "<think>mull it over</think>The answer.",
           reasoning_parser="deepseek_r1")
    msg = await client.messages.create(model=MODEL, max_tokens=32,
                                       messages=[{"role": "user", "content": "q"}])
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "mull it over"
    assert msg.content[1].text == "The answer."


async def test_count_tokens(keyed, client, make_card, tokenizer):
    engine = script(keyed, make_card, tokenizer, "ok")
    messages = [{"role": "user", "content": "count these words please"}]
    counted = await client.messages.count_tokens(model=MODEL, system="sys", messages=messages)
    await client.messages.create(model=MODEL, max_tokens=4, system="sys", messages=messages)
    assert counted.input_tokens == len(engine.requests[-1].token_ids)


async def test_errors_are_anthropic_shaped(keyed, client, card):
    keyed.add(card, EchoEngineClient())
    with pytest.raises(anthropic.NotFoundError) as nf:
        await client.messages.create(model="nope", max_tokens=4,
                                     messages=[{"role": "user", "content": "x"}])
    assert nf.value.body["type"] == "error"
    assert nf.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}])
    assert "image" in bad.value.body["error"]["message"]
    r = await raw_request(keyed.host, keyed.port, "POST", "/v1/messages", b'{"model": 1}',
                          {"x-api-key": KEY})
    assert r.status == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_x_api_key_and_bearer_both_authenticate(keyed, card):
    keyed.add(card, EchoEngineClient())
    body = json.dumps({"model": MODEL, "max_tokens": 2,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    for headers, status in [({"x-api-key": KEY}, 200), ({"authorization": f"Bearer {KEY}"}, 200),
                            ({"x-api-key": "wrong"}, 401), ({}, 401)]:
        r = await raw_request(keyed.host, keyed.port, "POST", "/v1/messages", body, headers)
        assert r.status == status, (headers, r.body)


async def test_mid_stream_engine_error_is_an_error_event(keyed, card, tokenizer):
    def failing(request):
        return [EngineOutput(token_ids=tokenizer.encode("partial")),
                EngineOutput(finish_reason="error", error="boom")]

    keyed.add(card, ScriptedEngineClient(failing))
    body = json.dumps({"model": MODEL, "max_tokens": 8, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    r = await raw_request(keyed.host, keyed.port, "POST", "/v1/messages", body, {"x-api-key": KEY})
    assert r.body.startswith(b"event: message_start")
    assert b"event: error" in r.body and b"boom" in r.body


# ---------------------------------------------------------------- stable prefix


def test_split_system_moves_the_tail_after_the_last_breakpoint():
    blocks = [an.TextBlock("You are an agent."), an.TextBlock("Tools...", an.CacheControl()),
              an.TextBlock("Today is 2026-12-03.")]
    assert split_system(blocks, False) == ("You are an agent.\nTools...\nToday is 2026-12-03.", "")
    assert split_system(blocks, True) == ("You are an agent.\nTools...", "Today is 2026-12-03.")
    no_marks = [an.TextBlock("Stable."), an.TextBlock("cwd=/tmp/x")]
    assert split_system(no_marks, True) == ("Stable.", "cwd=/tmp/x")
    assert split_system("a plain string", True) == ("a plain string", "")


def test_stable_prefix_keeps_earlier_turns_identical():
    def request(date: str, turns: int) -> an.MessagesRequest:
        msgs = []
        for t in range(turns):
            msgs += [an.InputMessage("user", f"question {t}"),
                     an.InputMessage("assistant", f"answer {t}")]
        msgs.append(an.InputMessage("user", "last"))
        system = [an.TextBlock("Agent rules.", an.CacheControl()), an.TextBlock(f"Date: {date}")]
        return an.MessagesRequest(model=MODEL, max_tokens=4, messages=msgs, system=system)

    chat = to_chat(request("2026-12-03", 2), True)
    assert chat.messages[0].content == "Agent rules."
    assert chat.messages[-1].content.endswith("<system-reminder>\nDate: 2026-12-03\n"
                                              "</system-reminder>")
    other = to_chat(request("2026-12-04", 2), True)
    assert chat.messages[:-1] == other.messages[:-1]


async def test_stable_prefix_raises_cached_tokens_on_a_real_prefix_cache(tmp_path):
    """The mocker's real scheduler and prefix-caching block pool behind the frontend."""
    from kvflow.engines.mocker import MockerConfig, MockerEngine
    from kvflow.llm.model_card import build_model_card
    from kvflow.llm.tokenizer import Tokenizer
    from kvflow.testing.tokenizer import make_model_dir

    model_dir = make_model_dir(tmp_path / "m", max_position_embeddings=8192)
    vocab = Tokenizer.from_dir(model_dir).vocab_size

    async def third_turn_cached(stable: bool) -> tuple[int, int]:
        engine = MockerEngine(MockerConfig(speedup_ratio=0, vocab_size=vocab, block_size=4))
        await engine.start()
        served = await start_served(FrontendConfig(port=0, anthropic_stable_prefix=stable))
        served.add(build_model_card(str(model_dir), model_name=MODEL), _Local(engine))
        client = anthropic.AsyncAnthropic(base_url=served.base_url, api_key="x", max_retries=0)
        messages: list[dict] = []
        try:
            for turn in range(3):
                system = [{"type": "text", "text": "Agent rules. " * 20,
                           "cache_control": {"type": "ephemeral"}},
                          {"type": "text", "text": f"Request number {turn}"}]
                messages.append({"role": "user", "content": f"step {turn} " * 20})
                msg = await client.messages.create(model=MODEL, max_tokens=8, system=system,
                                                   messages=messages)
                messages.append({"role": "assistant", "content": "done"})
            return msg.usage.cache_read_input_tokens, msg.usage.input_tokens
        finally:
            await client.close()
            await served.close()
            await engine.stop()

    base_cached, base_uncached = await third_turn_cached(False)
    stable_cached, stable_uncached = await third_turn_cached(True)
    # Off: the cache ends where the system prompt changes. On: the first turn is reused too
    # (the cache ends at the previous user turn, which carried the previous reminder).
    assert stable_cached > base_cached + 50
    assert stable_uncached * 1.5 < base_uncached


class _Local:
    def __init__(self, engine) -> None:
        self.generate = engine.generate

    def live_workers(self) -> int:
        return 1


async def test_tool_input_streams_in_pieces(keyed, make_card, tokenizer):
    script(keyed, make_card, tokenizer, CALL_TEXT, tool_call_parser="hermes")
    body = json.dumps({"model": MODEL, "max_tokens": 64, "stream": True, "tools": [WEATHER],
                       "messages": [{"role": "user", "content": "Weather?"}]}).encode()
    r = await raw_request(keyed.host, keyed.port, "POST", "/v1/messages", body, {"x-api-key": KEY})
    events = [json.loads(line[6:]) for line in r.body.decode().splitlines()
              if line.startswith("data: ")]
    pieces = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
              and e["delta"]["type"] == "input_json_delta"]
    assert len(pieces) > 2 and json.loads("".join(pieces)) == {"city": "Paris"}
