"""Models, probes, metrics and the OpenAPI document of a running frontend."""

from __future__ import annotations

import asyncio
import json
import threading

import openai
import pytest

from kvflow.frontend import FrontendConfig
from kvflow.frontend.testing import (
    EchoEngineClient,
    ScriptedEngineClient,
    Served,
    raw_request,
    start_served,
    tokens_script,
)
from kvflow.llm.protocol import EngineOutput
from kvflow.llm.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_two_models_side_by_side(served: Served, make_card, tokenizer):
    echo = EchoEngineClient()
    scripted = ScriptedEngineClient(tokens_script(tokenizer.encode("I am model B")))
    served.add(make_card("model-a"), echo)
    served.add(make_card("model-b"), scripted)
    models = await served.client.models.list()
    assert sorted(m.id for m in models.data) == ["model-a", "model-b"]
    assert all(m.owned_by == "kvflow" and m.object == "model" for m in models.data)
    a = await served.client.chat.completions.create(model="model-a", messages=MESSAGES)
    b = await served.client.chat.completions.create(model="model-b", messages=MESSAGES)
    assert b.choices[0].message.content == "I am model B"
    assert "hi" in a.choices[0].message.content
    assert len(echo.requests) == len(scripted.requests) == 1
    assert scripted.requests[0].model == "model-b"


async def test_removed_model_is_404(served: Served, make_card):
    served.add(make_card("gone"), EchoEngineClient())
    assert served.models.remove_model("gone")
    assert not served.models.remove_model("gone")
    with pytest.raises(openai.NotFoundError):
        await served.client.chat.completions.create(model="gone", messages=MESSAGES)


async def test_health_and_live(served: Served, card):
    live = await raw_request(served.host, served.port, "GET", "/live")
    assert live.status == 200
    not_ready = await raw_request(served.host, served.port, "GET", "/health")
    assert not_ready.status == 503
    served.add(card, EchoEngineClient())
    ready = await raw_request(served.host, served.port, "GET", "/health")
    assert ready.status == 200
    assert ready.json() == {"status": "ready", "models": {card.name: 1}, "restarting": {}}


async def test_metrics(served: Served, card):
    served.add(card, EchoEngineClient(cached_tokens=3))
    await served.client.chat.completions.create(model=card.name, messages=MESSAGES)
    stream = await served.client.completions.create(model=card.name, prompt="abc", stream=True)
    [c async for c in stream]
    resp = await raw_request(served.host, served.port, "GET", "/metrics")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.body.decode()
    label = f'model="{card.name}"'
    total = "kvflow_frontend_requests_total"
    for line in (
        f'{total}{{endpoint="chat_completions",{label},status="success"}} 1.0',
        f'{total}{{endpoint="completions",{label},status="success"}} 1.0',
        f"kvflow_frontend_inflight_requests{{{label}}} 0.0",
        f"kvflow_frontend_time_to_first_token_seconds_count{{{label}}} 2.0",
        f"kvflow_frontend_inter_token_latency_seconds_count{{{label}}} 2.0",
        f"kvflow_frontend_request_duration_seconds_count{{{label}}} 2.0",
        f"kvflow_frontend_input_sequence_tokens_count{{{label}}} 2.0",
        f"kvflow_frontend_output_sequence_tokens_count{{{label}}} 2.0",
        f"kvflow_frontend_cached_tokens_total{{{label}}} 6.0",
    ):
        assert line in text, line


async def test_metrics_count_errors_and_cancellations(served: Served, card, tokenizer):
    token = tokenizer.encode("a")[0]

    def failing(request):
        return [EngineOutput(token_ids=[token]), EngineOutput(finish_reason="error", error="boom")]

    served.add(card, ScriptedEngineClient(failing))
    with pytest.raises(openai.InternalServerError):
        await served.client.chat.completions.create(model=card.name, messages=MESSAGES)
    held = ScriptedEngineClient(tokens_script([token], None), hold_open=True)
    served.add(card, held)
    reader, writer = await asyncio.open_connection(served.host, served.port)
    body = json.dumps({"model": card.name, "prompt": "x", "stream": True}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\ncontent-length: %d\r\n\r\n%b"
                 % (len(body), body))
    await reader.readuntil(b"data: ")
    writer.close()
    await held.contexts[-1].stopped()
    await asyncio.sleep(0.01)
    text = (await raw_request(served.host, served.port, "GET", "/metrics")).body.decode()
    assert 'endpoint="chat_completions",model="test-model",status="error"} 1.0' in text
    assert 'endpoint="completions",model="test-model",status="cancelled"} 1.0' in text
    assert 'kvflow_frontend_inflight_requests{model="test-model"} 0.0' in text


async def test_openapi_document(served: Served):
    resp = await raw_request(served.host, served.port, "GET", "/openapi.json")
    assert resp.status == 200
    doc = resp.json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                 "/metrics"):
        assert path in paths
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(chat["required"])
    assert "temperature" in chat["properties"]
    body = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"] == "#/components/schemas/ChatCompletionRequest"

    def refs(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(doc):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


async def test_large_prompts_are_tokenized_in_the_thread_pool(card, tokenizer):
    threads: list[str] = []

    class RecordingTokenizer(Tokenizer):
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            threads.append(threading.current_thread().name)
            return super().encode(text, add_special_tokens)

    served = await start_served(FrontendConfig(port=0, offload_prompt_chars=1000))
    try:
        engine = EchoEngineClient()
        served.models.add_model(card, engine,
                                tokenizer=RecordingTokenizer(tokenizer.raw, tokenizer.checksum))
        await served.client.completions.create(model=card.name, prompt="short", max_tokens=1)
        await served.client.chat.completions.create(
            model=card.name, messages=[{"role": "user", "content": "long " * 500}], max_tokens=1
        )
        assert threads[0] == threading.current_thread().name
        assert threads[1].startswith("kvflow-preprocess")
        assert len(engine.requests[-1].token_ids) > 500
    finally:
        await served.close()


async def test_stop_lets_in_flight_requests_finish(card, tokenizer):
    served = await start_served()
    slow = ScriptedEngineClient(tokens_script(tokenizer.encode("one two three")), delay_s=0.05)
    served.add(card, slow)
    request = asyncio.ensure_future(
        served.client.completions.create(model=card.name, prompt="x")
    )
    while not slow.requests:
        await asyncio.sleep(0.005)
    await served.frontend.stop(grace_s=5)
    result = await request
    assert result.choices[0].text == "one two three"
    await served.client.close()


async def test_stop_cuts_requests_that_outlive_the_grace(card, tokenizer):
    served = await start_served()
    held = ScriptedEngineClient(tokens_script(tokenizer.encode("a"), None), hold_open=True)
    served.add(card, held)
    request = asyncio.ensure_future(
        served.client.completions.create(model=card.name, prompt="x")
    )
    while not held.requests:
        await asyncio.sleep(0.005)
    await served.frontend.stop(grace_s=0.05)
    with pytest.raises(openai.APIConnectionError):
        await request
    await held.contexts[-1].stopped()  # the engine was told to stop
    await served.client.close()
