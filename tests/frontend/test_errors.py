"""Malformed and impossible requests get OpenAI-shaped errors that name the problem."""

from __future__ import annotations

import json

import openai
import pytest

from kvflow.frontend import FrontendConfig
from kvflow.frontend.testing import EchoEngineClient, Served, raw_request, start_served

MODEL = "test-model"
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


async def post(served: Served, path: str, body: bytes | dict, **headers: str):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await raw_request(served.host, served.port, "POST", path, data,
                             {"content-type": "application/json", **headers})


def error_of(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_malformed_json(served: Served, echo):
    resp = await post(served, "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert resp.status == 400
    err = error_of(resp)
    assert err["type"] == "invalid_request_error"
    assert "not valid JSON" in err["message"]


async def test_empty_body(served: Served, echo):
    resp = await post(served, "/v1/completions", b"")
    assert resp.status == 400
    assert "empty" in error_of(resp)["message"]


async def test_body_not_an_object(served: Served, echo):
    resp = await post(served, "/v1/chat/completions", b"[1, 2]")
    assert resp.status == 400
    assert "object" in error_of(resp)["message"]


@pytest.mark.parametrize(
    ("patch", "param", "words"),
    [
        ({"model": 5}, "model", "Expected `str`"),
        ({"messages": []}, "messages", "length >= 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "Missing required"),
        ({"temperature": -1}, "temperature", ">= 0.0"),
        ({"top_p": 1.5}, "top_p", "<= 1.0"),
        ({"n": 0}, "n", ">= 1"),
        ({"max_tokens": "ten"}, "max_tokens", "got `str`"),
        ({"stop": 3}, "stop", "Expected"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs", "<= 20"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type", "not supported"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
        ({"stop": ["", "x"]}, "stop", "must not be empty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
        ({"presence_penalty": 3}, "presence_penalty", "<= 2.0"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "may not set"),
        ({"add_generation_prompt": True, "continue_final_message": True},
         "continue_final_message", "cannot both"),
    ],
)
async def test_chat_validation_names_the_field(served: Served, echo, patch, param, words):
    resp = await post(served, "/v1/chat/completions", {**OK_CHAT, **patch})
    assert resp.status == 400
    err = error_of(resp)
    assert err["param"] == param
    assert words in err["message"]
    assert param in err["message"]


@pytest.mark.parametrize(
    ("prompt", "param"),
    [([], "prompt"), ([1, "a"], "prompt"), ([[1, 2], []], "prompt[1]"), ([10**9], "prompt")],
)
async def test_bad_prompts(served: Served, echo, prompt, param):
    resp = await post(served, "/v1/completions", {"model": MODEL, "prompt": prompt})
    assert resp.status == 400
    assert error_of(resp)["param"] == param


async def test_unknown_model_is_404(served: Served, echo):
    with pytest.raises(openai.NotFoundError) as info:
        await served.client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}]
        )
    err = info.value.body
    assert err["code"] == "model_not_found"
    assert "nope" in err["message"] and MODEL in err["message"]


async def test_context_overflow_gives_both_numbers(served: Served, echo):
    with pytest.raises(openai.BadRequestError) as info:
        await served.client.completions.create(model=MODEL, prompt="hello", max_tokens=5000)
    msg = info.value.body["message"]
    assert info.value.body["code"] == "context_length_exceeded"
    assert "2048" in msg and "5000" in msg
    assert echo.requests == []  # nothing reached the engine


async def test_prompt_alone_over_context(served: Served, echo, tokenizer):
    long_prompt = [5] * 2048
    with pytest.raises(openai.BadRequestError) as info:
        await served.client.completions.create(model=MODEL, prompt=long_prompt)
    msg = info.value.body["message"]
    assert "2048 tokens" in msg and "2048 in the prompt" in msg


async def test_body_too_large_is_413():
    served = await start_served(FrontendConfig(port=0, max_body_bytes=1000))
    try:
        big = json.dumps({**OK_CHAT, "messages": [{"role": "user", "content": "x" * 5000}]})
        resp = await post(served, "/v1/chat/completions", big.encode())
        assert resp.status == 413
        assert error_of(resp)["code"] == "request_too_large"
        with pytest.raises(openai.APIStatusError) as info:
            await served.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "y" * 200_000}]
            )
        assert info.value.status_code == 413
    finally:
        await served.close()


async def test_no_live_worker_is_503(served: Served, card):
    served.add(card, EchoEngineClient(workers=0))
    resp = await post(served, "/v1/chat/completions", OK_CHAT)
    assert resp.status == 503
    assert error_of(resp)["code"] == "no_workers"


async def test_unknown_route_and_wrong_method(served: Served):
    resp = await raw_request(served.host, served.port, "GET", "/v2/nothing")
    assert resp.status == 404
    resp = await raw_request(served.host, served.port, "GET", "/v1/chat/completions")
    assert resp.status == 405
    assert "POST" in error_of(resp)["message"]


async def test_endpoint_the_model_does_not_serve(served: Served, make_card):
    served.add(make_card(model_types=("completions",)), EchoEngineClient())
    resp = await post(served, "/v1/chat/completions", OK_CHAT)
    assert resp.status == 400
    assert "/v1/completions" in error_of(resp)["message"]


async def test_unsupported_completion_options(served: Served, echo):
    for patch, param in (({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"),
                         ({"echo": True, "logprobs": 1}, "echo")):
        resp = await post(served, "/v1/completions", {"model": MODEL, "prompt": "a", **patch})
        assert resp.status == 400
        assert error_of(resp)["param"] == param


async def test_api_keys(card):
    served = await start_served(FrontendConfig(port=0, api_keys=("secret-1", "secret-2")),
                                api_key="secret-2")
    try:
        served.add(card, EchoEngineClient())
        r = await served.client.chat.completions.create(**OK_CHAT)
        assert r.choices[0].message.content
        resp = await post(served, "/v1/chat/completions", OK_CHAT, authorization="Bearer wrong")
        assert resp.status == 401
        assert resp.headers["www-authenticate"] == "Bearer"
        assert error_of(resp)["code"] == "invalid_api_key"
        resp = await post(served, "/v1/chat/completions", OK_CHAT)
        assert resp.status == 401
        health = await raw_request(served.host, served.port, "GET", "/health")
        assert health.status == 200  # probes need no key
    finally:
        await served.close()
