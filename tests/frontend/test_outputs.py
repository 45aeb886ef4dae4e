"""Postprocessing seen through the API: stop strings, UTF-8, tool calls, reasoning, logprobs."""

from __future__ import annotations

import json

import openai
import pytest
from msgspec.structs import replace

from kvflow.frontend.testing import ScriptedEngineClient, Served, tokens_script
from kvflow.llm.model_card import ModelCard, build_model_card
from kvflow.llm.protocol import EngineOutput, TopLogprob
from kvflow.llm.tokenizer import Tokenizer
from kvflow.testing.tokenizer import make_model_dir

MODEL = "test-model"
MESSAGES = [{"role": "user", "content": "go"}]


def scripted(served: Served, card: ModelCard, tokenizer: Tokenizer, text: str, **kw):
    engine = ScriptedEngineClient(tokens_script(tokenizer.encode(text)), **kw)
    served.add(card, engine)
    return engine


async def chat_text(served: Served, stream: bool, **kw) -> tuple[str, str | None]:
    if not stream:
        r = await served.client.chat.completions.create(model=MODEL, messages=MESSAGES, **kw)
        return r.choices[0].message.content or "", r.choices[0].finish_reason
    s = await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, **kw
    )
    text, finish = "", None
    async for c in s:
        text += c.choices[0].delta.content or ""
        finish = c.choices[0].finish_reason or finish
    return text, finish


# ---------------------------------------------------------------- stop strings


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_across_tokens_is_not_leaked(served, card, tokenizer, stream):
    # "STOP" is four tokens (S, T, O, P) in the test tokenizer.
    engine = scripted(served, card, tokenizer, "Hello STOP world and more", hold_open=True)
    text, finish = await chat_text(served, stream, stop=["STOP"])
    assert text == "Hello "
    assert finish == "stop"
    assert engine.contexts[-1].is_stopped()
    assert engine.closed  # the engine stream was released


async def test_stop_string_included_when_asked(served, card, tokenizer):
    scripted(served, card, tokenizer, "Hello STOP world")
    text, _ = await chat_text(
        served, False, stop="STOP", extra_body={"include_stop_str_in_output": True}
    )
    assert text == "Hello STOP"


async def test_partial_stop_prefix_is_released_at_end(served, card, tokenizer):
    scripted(served, card, tokenizer, "Hello ST")
    text, finish = await chat_text(served, True, stop=["STOP"])
    assert (text, finish) == ("Hello ST", "stop")


async def test_stop_on_one_choice_of_n(served, card, tokenizer):
    engine = scripted(served, card, tokenizer, "ab STOP cd", hold_open=True)
    r = await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, stop=["STOP"]
    )
    assert [c.message.content for c in r.choices] == ["ab ", "ab "]
    assert all(c.is_stopped() for c in engine.contexts[-2:])


# ---------------------------------------------------------------- UTF-8


@pytest.mark.parametrize("kind", ["byte_level", "bpe_byte_fallback"])
@pytest.mark.parametrize("stream", [False, True])
async def test_utf8_round_trip(served, tmp_path, kind, stream):
    model_dir = make_model_dir(tmp_path / kind, kind=kind)
    tok = Tokenizer.from_dir(model_dir)
    text = "héllo 你好 🙂 naïve — ok"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
    served.add(build_model_card(str(model_dir), model_name=MODEL),
               ScriptedEngineClient(tokens_script(ids)))
    got, _ = await chat_text(served, stream)
    # Sentencepiece marks the first word with "▁"; after a prompt that is a real space.
    assert got == (" " + text if kind == "bpe_byte_fallback" else text)


# ---------------------------------------------------------------- tool calls and reasoning


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}]
CALL_TEXT = (
    'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
    "</tool_call>"
)


async def test_tool_call_non_streaming(served, make_card, tokenizer):
    card = make_card(tool_call_parser="hermes")
    engine = scripted(served, card, tokenizer, CALL_TEXT)
    r = await served.client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    prompt = tokenizer.decode(engine.requests[-1].token_ids, skip_special_tokens=False)
    assert "get_weather" in prompt  # the tools reached the chat template


async def test_tool_call_streaming(served, make_card, tokenizer):
    scripted(served, make_card(tool_call_parser="hermes"), tokenizer, CALL_TEXT + CALL_TEXT[13:])
    stream = await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True
    )
    content, deltas, finish = "", [], None
    async for c in stream:
        d = c.choices[0].delta
        content += d.content or ""
        deltas.extend(d.tool_calls or [])
        finish = c.choices[0].finish_reason or finish
    assert content == "Let me check."
    assert sorted({c.index for c in deltas}) == [0, 1]
    for index in (0, 1):  # the first delta of a call names it; the arguments follow in pieces
        mine = [c for c in deltas if c.index == index]
        assert mine[0].id.startswith("call_") and mine[0].function.name == "get_weather"
        assert all(c.id is None and c.function.name is None for c in mine[1:])
        assert len(mine) > 2  # one token at a time: the arguments came in several pieces
        assert "".join(c.function.arguments or "" for c in mine) == '{"city": "Paris"}'
    assert finish == "tool_calls"
    whole = await served.client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                        tools=TOOLS)
    assert [c.function.arguments for c in whole.choices[0].message.tool_calls] == [
        '{"city": "Paris"}'] * 2


async def test_tool_choice_none_leaves_text_alone(served, make_card, tokenizer):
    engine = scripted(served, make_card(tool_call_parser="hermes"), tokenizer, CALL_TEXT)
    r = await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="none"
    )
    assert r.choices[0].message.tool_calls is None
    assert "<tool_call>" in r.choices[0].message.content
    prompt = tokenizer.decode(engine.requests[-1].token_ids, skip_special_tokens=False)
    assert "get_weather" not in prompt


async def test_assistant_tool_call_history_renders(served, make_card, tokenizer):
    engine = scripted(served, make_card(tool_call_parser="hermes"), tokenizer, "Sunny.")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = await served.client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert r.choices[0].message.content == "Sunny."
    prompt = tokenizer.decode(engine.requests[-1].token_ids, skip_special_tokens=False)
    assert '"city": "Paris"' in prompt and "sunny" in prompt


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_content(served, make_card, tokenizer, stream):
    scripted(served, make_card(reasoning_parser="think"), tokenizer,
             "<think>Let me think.</think>The answer is 4.")
    if not stream:
        r = await served.client.chat.completions.create(model=MODEL, messages=MESSAGES)
        msg = r.choices[0].message
        assert msg.content == "The answer is 4."
        assert msg.model_extra["reasoning_content"] == "Let me think."
        return
    s = await served.client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    content = reasoning = ""
    async for c in s:
        d = c.choices[0].delta
        content += d.content or ""
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
    assert (reasoning, content) == ("Let me think.", "The answer is 4.")


async def test_reasoning_opened_by_template(served, make_card, tokenizer):
    """With enable_thinking the template opens <think>; output starts inside reasoning."""
    template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<think>\n{% endif %}"
    )
    card = replace(make_card(reasoning_parser="think"), chat_template=template)
    scripted(served, card, tokenizer, "hidden plan</think>Visible.")
    r = await served.client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert r.choices[0].message.content == "Visible."
    assert r.choices[0].message.model_extra["reasoning_content"] == "hidden plan"


# ---------------------------------------------------------------- logprobs


def logprob_script(tokenizer: Tokenizer, text: str):
    ids = tokenizer.encode(text)

    def script(request):
        outs = []
        for i, t in enumerate(ids):
            tops = [TopLogprob(t, -0.1 * i), TopLogprob(ids[0], -2.0), TopLogprob(ids[-1], -3.0)]
            outs.append(EngineOutput(token_ids=[t], logprobs=[-0.1 * i], top_logprobs=[tops]))
        outs[-1].finish_reason = "stop"
        return outs

    return ids, script


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_logprobs(served, card, tokenizer, stream):
    ids, script = logprob_script(tokenizer, "Hi there")
    served.add(card, ScriptedEngineClient(script))
    kw = {"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 2}
    if stream:
        s = await served.client.chat.completions.create(stream=True, **kw)
        content = [
            x async for c in s if c.choices[0].logprobs for x in c.choices[0].logprobs.content
        ]
    else:
        r = await served.client.chat.completions.create(**kw)
        content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([i]) for i in ids]
    assert [c.logprob for c in content] == pytest.approx([-0.1 * i for i in range(len(ids))])
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].bytes == list(content[0].token.encode())
    assert content[1].top_logprobs[1].logprob == -2.0


@pytest.mark.parametrize("stream", [False, True])
async def test_completion_logprobs(served, card, tokenizer, stream):
    ids, script = logprob_script(tokenizer, "Hi there")
    served.add(card, ScriptedEngineClient(script))
    kw = {"model": MODEL, "prompt": "x", "logprobs": 1}
    if stream:
        s = await served.client.completions.create(stream=True, **kw)
        tokens, offsets, tops = [], [], []
        async for c in s:
            lp = c.choices[0].logprobs
            if lp:
                tokens += lp.tokens
                offsets += lp.text_offset
                tops += lp.top_logprobs
    else:
        r = await served.client.completions.create(**kw)
        lp = r.choices[0].logprobs
        tokens, offsets, tops = lp.tokens, lp.text_offset, lp.top_logprobs
    texts = [tokenizer.decode([i]) for i in ids]
    assert tokens == texts
    assert offsets == [sum(len(t) for t in texts[:k]) for k in range(len(texts))]
    assert all(len(t) == 1 for t in tops)


async def test_engine_error_mid_stream_reaches_client(served, card, tokenizer):
    def script(request):
        return [EngineOutput(token_ids=[tokenizer.encode("a")[0]]),
                EngineOutput(finish_reason="error", error="GPU fell off the bus")]

    served.add(card, ScriptedEngineClient(script))
    s = await served.client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="GPU fell off the bus"):
        async for _ in s:
            pass
    with pytest.raises(openai.InternalServerError, match="GPU fell off the bus"):
        await served.client.chat.completions.create(model=MODEL, messages=MESSAGES)


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
async def test_forced_tool_choice_becomes_a_grammar(served, make_card, tokenizer, choice):
    pytest.importorskip("llguidance")
    card = replace(make_card(tool_call_parser="hermes"), guided_decoding=True)
    engine = scripted(served, card, tokenizer, CALL_TEXT)
    await served.client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                                tool_choice=choice)
    fmt = engine.requests[-1].sampling.response_format
    assert fmt["type"] == "lark" and "get_weather" in fmt["lark"]
    await served.client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    assert engine.requests[-1].sampling.response_format is None  # "auto" stays free


async def test_forced_tool_choice_with_a_bad_schema_is_a_400(served, make_card, tokenizer):
    pytest.importorskip("llguidance")
    scripted(served, replace(make_card(tool_call_parser="hermes"), guided_decoding=True),
             tokenizer, CALL_TEXT)
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]
    with pytest.raises(openai.BadRequestError, match="nope"):
        await served.client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=bad,
                                                    tool_choice="required")
