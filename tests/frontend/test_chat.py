"""/v1/chat/completions through the official openai client: shapes, streaming, fields."""

from __future__ import annotations

import msgspec
import openai
import pytest

from kvflow.frontend.testing import EchoEngineClient, Served
from kvflow.llm.tokenizer import Tokenizer

MODEL = "test-model"
MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


def expected_echo(echo: EchoEngineClient, tokenizer: Tokenizer) -> str:
    """The echo engine returns the prompt, so the answer is the prompt without specials."""
    return tokenizer.decode(echo.requests[-1].token_ids, skip_special_tokens=True)


async def test_non_streaming_shape(served: Served, echo: EchoEngineClient, tokenizer: Tokenizer):
    r = await served.client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == MODEL
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.message.content == expected_echo(echo, tokenizer)
    assert "Hello there, how are you?" in choice.message.content
    prompt_len = len(echo.requests[-1].token_ids)
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.completion_tokens == prompt_len
    assert r.usage.total_tokens == 2 * prompt_len


async def test_streaming_matches_non_streaming(
    served: Served, echo: EchoEngineClient, tokenizer: Tokenizer
):
    stream = await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_echo(echo, tokenizer)
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == len(echo.requests[-1].token_ids)


async def test_stream_without_usage_has_no_usage_chunk(served: Served, echo: EchoEngineClient):
    stream = await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True
    )
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_gives_length(served: Served, echo: EchoEngineClient, field: str):
    r = await served.client.chat.completions.create(model=MODEL, messages=MESSAGES, **{field: 3})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    assert echo.requests[-1].stop.max_tokens == 3


async def test_default_max_tokens_fills_context(served: Served, echo: EchoEngineClient):
    await served.client.chat.completions.create(model=MODEL, messages=MESSAGES)
    req = echo.requests[-1]
    assert req.stop.max_tokens == 2048 - len(req.token_ids)


async def test_response_format_needs_an_engine_that_can_honour_it(served: Served, echo):
    with pytest.raises(openai.BadRequestError) as info:
        await served.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, response_format={"type": "json_object"})
    assert info.value.body["param"] == "response_format"
    assert "guided decoding" in info.value.body["message"]
    r = await served.client.chat.completions.create(  # plain text is always fine
        model=MODEL, messages=MESSAGES, response_format={"type": "text"})
    assert r.choices[0].message.content


async def test_bad_schema_is_a_400_naming_the_problem(served: Served, card):
    pytest.importorskip("llguidance")
    served.add(msgspec.structs.replace(card, guided_decoding=True), EchoEngineClient())
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    with pytest.raises(openai.BadRequestError) as info:
        await served.client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                    response_format=bad)
    assert info.value.body["param"] == "response_format"
    assert "objectx" in info.value.body["message"]
    missing = {"type": "json_schema", "json_schema": {"name": "x"}}
    with pytest.raises(openai.BadRequestError, match="schema"):
        await served.client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                    response_format=missing)


async def test_sampling_fields_reach_engine(served: Served, card):
    card = msgspec.structs.replace(card, guided_decoding=True)
    echo = EchoEngineClient()
    served.add(card, echo)
    await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0.7, top_p=0.9, seed=11,
        presence_penalty=0.5, frequency_penalty=-0.5, logprobs=True, top_logprobs=3,
        response_format={"type": "json_object"}, user="u1",
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
                    "stop_token_ids": [7, 8], "ignore_eos": True},
    )
    req = echo.requests[-1]
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0.7, 0.9, 40, 0.05, 11)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.1)
    assert s.logprobs == 3
    assert s.response_format == {"type": "json_object"}
    assert req.stop.min_tokens == 2
    assert req.stop.stop_token_ids == [7, 8]
    assert req.stop.ignore_eos is True
    assert req.eos_token_ids == card.eos_token_ids
    assert req.model == MODEL


async def test_n_choices_get_own_seeds(served: Served, echo: EchoEngineClient, tokenizer):
    r = await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=3, seed=100, max_tokens=4
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert sorted(q.sampling.seed for q in echo.requests[-3:]) == [100, 101, 102]
    assert len({q.request_id for q in echo.requests[-3:]}) == 3
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(echo.requests[-1].token_ids)


async def test_n_choices_streaming(served: Served, echo: EchoEngineClient, tokenizer):
    stream = await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, stream=True
    )
    texts = {0: "", 1: ""}
    finish = {}
    async for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert texts[0] == texts[1] == expected_echo(echo, tokenizer)
    assert finish == {0: "stop", 1: "stop"}


async def test_content_parts_and_roles(served: Served, echo: EchoEngineClient, tokenizer):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "part one"},
                                     {"type": "text", "text": "part two"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    r = await served.client.chat.completions.create(model=MODEL, messages=messages)
    text = r.choices[0].message.content
    for piece in ("Be brief.", "part one\npart two", "ok", "again"):
        assert piece in text


async def test_cached_tokens_in_usage(served: Served, card):
    served.add(card, EchoEngineClient(cached_tokens=5))
    r = await served.client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert r.usage.prompt_tokens_details.cached_tokens == 5
    stream = await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 5


async def test_continue_final_message(served: Served, echo: EchoEngineClient, tokenizer):
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi the"}]
    await served.client.chat.completions.create(
        model=MODEL, messages=messages,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    prompt = tokenizer.decode(echo.requests[-1].token_ids, skip_special_tokens=False)
    assert prompt.endswith("Hi the")


async def test_chat_template_kwargs_reach_template(served: Served, echo, tokenizer):
    await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    prompt = tokenizer.decode(echo.requests[-1].token_ids, skip_special_tokens=False)
    assert prompt.endswith("<think>\n\n</think>\n\n")


async def test_x_request_id_is_the_engine_request_id(served: Served, echo: EchoEngineClient):
    await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_headers={"X-Request-Id": "trace-42"}
    )
    assert echo.requests[-1].request_id == "trace-42"
    assert echo.contexts[-1].request_id == "trace-42"


async def test_engine_unavailable_is_503(served: Served, card):
    served.add(card, EchoEngineClient(workers=0))
    with pytest.raises(openai.APIStatusError) as info:
        await served.client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert info.value.status_code == 503
    assert "No live worker" in info.value.message


async def test_session_key_becomes_a_routing_hint(served: Served, echo: EchoEngineClient):
    # The X-Session-Id header wins; the OpenAI `user` field is the fallback; none: no hint.
    await served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, user="alice", extra_headers={"X-Session-Id": "conv-7"})
    assert echo.requests[-1].routing.session_id == "conv-7"
    await served.client.completions.create(model=MODEL, prompt="hi", max_tokens=2, user="alice")
    assert echo.requests[-1].routing.session_id == "alice"
    await served.client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert echo.requests[-1].routing is None
    with pytest.raises(openai.BadRequestError, match="session key"):
        await served.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"X-Session-Id": "s" * 300})
