"""POST /v1/responses through the official `openai` client's `responses` API."""

from __future__ import annotations

import json

import openai
import pytest

from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.responses_request import ResponseStore
from kvflow.frontend.testing import EchoEngineClient, ScriptedEngineClient, start_served, tokens_script
from kvflow.llm.openai import ChatMessage

MODEL = "test-model"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL_TEXT = ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
             "</tool_call>")


def script(served, make_card, tokenizer, text: str, **card_kw) -> ScriptedEngineClient:
    engine = ScriptedEngineClient(tokens_script(tokenizer.encode(text)))
    served.add(make_card(**card_kw), engine)
    return engine


def prompt_of(engine, tokenizer) -> str:
    return tokenizer.decode(engine.requests[-1].token_ids, skip_special_tokens=False)


async def test_text_input_and_instructions(served, make_card, tokenizer):
    engine = script(served, make_card, tokenizer, "Hello there")
    r = await served.client.responses.create(model=MODEL, input="hi", instructions="Be brief.",
                                             max_output_tokens=16)
    assert r.id.startswith("resp_") and r.status == "completed" and r.object == "response"
    assert r.output_text == "Hello there"
    assert [item.type for item in r.output] == ["message"]
    assert r.usage.output_tokens == len(tokenizer.encode("Hello there"))
    assert r.usage.input_tokens == len(engine.requests[-1].token_ids)
    assert "Be brief." in prompt_of(engine, tokenizer)
    assert engine.requests[-1].stop.max_tokens == 16


async def test_streaming_event_sequence(served, make_card, tokenizer):
    script(served, make_card, tokenizer, "Hello there")
    stream = await served.client.responses.create(model=MODEL, input="hi", stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello there" == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens > 0


async def test_stream_helper_final_response(served, make_card, tokenizer):
    script(served, make_card, tokenizer, "<think>hmm</think>Answer.", reasoning_parser="qwen3")
    async with served.client.responses.stream(model=MODEL, input="q") as stream:
        final = await stream.get_final_response()
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "hmm"
    assert final.output_text == "Answer."


@pytest.mark.parametrize("stream", [False, True])
async def test_function_call(served, make_card, tokenizer, stream):
    script(served, make_card, tokenizer, CALL_TEXT, tool_call_parser="hermes")
    args = dict(model=MODEL, input="Weather in Paris?", tools=[WEATHER])
    if stream:
        async with served.client.responses.stream(**args) as s:
            r = await s.get_final_response()
    else:
        r = await served.client.responses.create(**args)
    assert [item.type for item in r.output] == ["message", "function_call"]
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_")


async def test_previous_response_id_continues_the_conversation(served, make_card, tokenizer):
    engine = script(served, make_card, tokenizer, "Sunny.", tool_call_parser="hermes")
    first = await served.client.responses.create(model=MODEL, input="first question",
                                                 instructions="SYS-ONE")
    second = await served.client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "second question"}],
        previous_response_id=first.id)
    prompt = prompt_of(engine, tokenizer)
    assert "first question" in prompt and "second question" in prompt
    assert prompt.count("Sunny.") == 1  # the first answer, now history
    assert "SYS-ONE" not in prompt  # instructions are not carried over
    assert second.previous_response_id == first.id


async def test_function_call_output_round_trip(served, make_card, tokenizer):
    engine = script(served, make_card, tokenizer, "It is sunny.", tool_call_parser="hermes")
    await served.client.responses.create(model=MODEL, tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_9", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_9", "output": "sunny, 21C"},
    ])
    prompt = prompt_of(engine, tokenizer)
    assert "sunny, 21C" in prompt and '"city": "Paris"' in prompt


async def test_max_output_tokens_is_incomplete(served, card):
    served.add(card, EchoEngineClient(repeat=True))
    r = await served.client.responses.create(model=MODEL, input="hello world",
                                             max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


async def test_errors(served, card):
    served.add(card, EchoEngineClient())
    with pytest.raises(openai.NotFoundError, match="not found"):
        await served.client.responses.create(model=MODEL, input="x",
                                             previous_response_id="resp_missing")
    with pytest.raises(openai.BadRequestError, match="web_search"):
        await served.client.responses.create(model=MODEL, input="x",
                                             tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="input_image"):
        await served.client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://x"}]}])


async def test_store_false_and_bounded_store(make_card, tokenizer):
    served = await start_served(FrontendConfig(port=0, responses_store_size=2))
    try:
        script(served, make_card, tokenizer, "ok")
        kept = await served.client.responses.create(model=MODEL, input="a", store=False)
        ids = [(await served.client.responses.create(model=MODEL, input=q)).id for q in "bcd"]
        for gone in (kept.id, ids[0]):
            with pytest.raises(openai.NotFoundError):
                await served.client.responses.create(model=MODEL, input="x",
                                                     previous_response_id=gone)
        await served.client.responses.create(model=MODEL, input="x", previous_response_id=ids[2])
    finally:
        await served.close()


def test_store_drops_least_recently_used():
    store = ResponseStore(2)
    for rid in "abc":
        store.put(rid, [ChatMessage("user", rid)])
    assert len(store) == 2
    store.get("b")
    store.put("d", [])
    store.get("b")
    with pytest.raises(Exception, match="not found"):
        store.get("c")


async def test_function_call_arguments_stream_in_pieces(served, make_card, tokenizer):
    script(served, make_card, tokenizer, CALL_TEXT, tool_call_parser="hermes")
    stream = await served.client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER],
                                                  stream=True)
    events = [e async for e in stream]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 2 and "".join(deltas) == done.arguments == '{"city": "Paris"}'
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == [0, 1]  # the message, then the call
