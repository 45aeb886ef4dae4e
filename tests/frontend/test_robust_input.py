"""Hostile input, hand-written: each case gets a 4xx with an OpenAI error body, fast, and a
well-formed stream running alongside is not disturbed."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from kvflow.frontend import FrontendConfig
from kvflow.frontend.testing import EchoEngineClient, raw_request, read_response, start_served

MODEL = "test-model"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def _chat(**kw: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}
                      ).encode()


def _comp(**kw: object) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hi", **kw}).encode()


def _nested(depth: int, field: bytes) -> bytes:
    return (b'{"model":"test-model","messages":[{"role":"user","content":"hi"}],' + field
            + b":{\"x\":" + b"[" * depth + b"]" * depth + b"}}")


MILLION = 1_000_000
CASES = {
    # (path, body) -> (status, param or None)
    "nested 10k levels": (CHAT, _nested(10_000, b'"chat_template_kwargs"'), 400, None),
    "nested 100 levels in kwargs": (CHAT, _nested(100, b'"chat_template_kwargs"'), 400,
                                    "chat_template_kwargs"),
    "deep tool parameters": (CHAT, _chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": json.loads("[" * 60 + "]" * 60)}}]), 400, None),
    "deep response_format": (COMP, _comp(response_format={"type": "json_schema", "json_schema": {
        "schema": {"a": json.loads("[" * 60 + "]" * 60)}}}), 400, "response_format"),
    "invalid utf-8": (CHAT, b'{"model":"test-model","messages":[{"role":"user","content":"\xff\xfe"}]}',
                      400, None),
    "lone surrogate escape": (CHAT, b'{"model":"test-model","messages":[{"role":"user",'
                              b'"content":"\\udc00"}],"max_tokens":2}', 400, None),
    "NaN": (COMP, b'{"model":"test-model","prompt":"hi","temperature":NaN}', 400, None),
    "Infinity": (COMP, b'{"model":"test-model","prompt":"hi","top_p":Infinity}', 400, None),
    "1e999": (COMP, b'{"model":"test-model","prompt":"hi","temperature":1e999}', 400,
              "temperature"),
    "negative max_tokens": (COMP, _comp(max_tokens=-5), 400, "max_tokens"),
    "enormous max_tokens": (COMP, _comp(max_tokens=2**70), 400, "prompt"),
    "u64 max_tokens": (COMP, _comp(max_tokens=2**64 - 1), 400, "prompt"),
    "enormous seed": (COMP, _comp(seed=2**64 - 1), 400, "seed"),
    "enormous min_tokens": (COMP, _comp(min_tokens=2**63), 400, "min_tokens"),
    "min over max": (COMP, _comp(min_tokens=9, max_tokens=3), 400, "min_tokens"),
    "enormous top_k": (COMP, _comp(top_k=2**40), 400, "top_k"),
    "negative n": (COMP, _comp(n=-1), 400, "n"),
    "n x prompts": (COMP, json.dumps({"model": MODEL, "prompt": ["a"] * 100, "n": 100}).encode(),
                    400, "n"),
    "5000 stop strings": (COMP, _comp(stop=[f"s{i}" for i in range(5000)]), 400, "stop"),
    "a huge stop string": (COMP, _comp(stop=["x" * 100_000]), 400, "stop"),
    "stop ids outside vocab": (COMP, _comp(stop_token_ids=[5, 10**9]), 400, "stop_token_ids"),
    "negative stop id": (COMP, _comp(stop_token_ids=[-1]), 400, "stop_token_ids"),
    "no messages": (CHAT, json.dumps({"model": MODEL, "messages": []}).encode(), 400,
                    "messages"),
    "empty message object": (CHAT, json.dumps({"model": MODEL, "messages": [{}]}).encode(), 400,
                             "messages[0].role"),
    "unknown role": (CHAT, json.dumps({"model": MODEL, "messages": [
        {"role": "overlord", "content": "obey"}]}).encode(), 400, "messages[0].role"),
    "content of wrong type": (CHAT, json.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": 42}]}).encode(), 400, "messages[0].content"),
    "prompt ids outside vocab": (COMP, _comp(prompt=[1, 2, 10**6]), 400, "prompt"),
    "prompt ids beyond int64": (COMP, _comp(prompt=[2**64 + 1]), 400, None),
    "negative prompt id": (COMP, _comp(prompt=[[-3]]), 400, "prompt[0]"),
    "million token ids": (COMP, _comp(prompt=[7] * MILLION), 400, "prompt"),
    "million token text": (COMP, _comp(prompt="hey " * MILLION), 400, "prompt"),
    "million token chat": (CHAT, json.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": "hey " * MILLION}]}).encode(), 400, "messages"),
    "unknown model": (CHAT, json.dumps({"model": "x" * 10_000, "messages": [
        {"role": "user", "content": "hi"}]}).encode(), 404, "model"),
    "array body": (CHAT, b"[" * 50_000, 400, None),
    "long request id": (COMP, _comp(max_tokens=2), 400, "x-request-id"),
}


async def _post(served, path: str, body: bytes, **headers: str):
    return await raw_request(served.host, served.port, "POST", path, body,
                             {"content-type": "application/json", **headers})


@pytest.fixture
async def slow_echo(served, card) -> EchoEngineClient:
    engine = EchoEngineClient(delay_s=0.002, repeat=True, keep_history=False)
    served.add(card, engine)
    return engine


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_case(served, slow_echo, name: str) -> None:
    path, body, status, param = CASES[name]
    headers = {"x-request-id": "r" * 1000} if name == "long request id" else {}
    start = time.perf_counter()
    resp = await _post(served, path, body, **headers)
    elapsed = time.perf_counter() - start
    assert resp.status == status, resp.body[:300]
    if status >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param is not None:
            assert error["param"] == param, error
    assert elapsed < 2.0, f"{name} took {elapsed:.2f}s"  # refused early, not after the work


async def test_million_token_prompts_are_refused_without_tokenizing(served, slow_echo) -> None:
    for name in ("million token text", "million token chat", "million token ids"):
        path, body, _, _ = CASES[name]
        start = time.perf_counter()
        resp = await _post(served, path, body)
        assert resp.status == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
        assert time.perf_counter() - start < 0.5  # tokenizing it would take seconds


async def test_hostile_traffic_does_not_disturb_a_stream(served, slow_echo) -> None:
    body = _comp(prompt="a well formed request", max_tokens=300, stream=True)
    stream = asyncio.ensure_future(_post(served, COMP, body))
    hostile = [_post(served, p, b) for p, b, _, _ in CASES.values()]
    await asyncio.gather(*hostile)
    resp = await stream
    assert resp.status == 200
    events = [e for e in resp.body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"


async def test_headers_over_the_limit_get_431(card) -> None:
    served = await start_served(FrontendConfig(port=0, max_header_bytes=2048))
    served.add(card, EchoEngineClient())
    try:
        resp = await _post(served, COMP, _comp(max_tokens=2), **{"x-junk": "j" * 5000})
        assert resp.status == 431 and resp.json()["error"]["code"] == "headers_too_large"
        many = {f"x-h{i}": "v" * 40 for i in range(100)}
        assert (await _post(served, COMP, _comp(max_tokens=2), **many)).status == 431
        assert (await _post(served, COMP, _comp(max_tokens=2))).status == 200
    finally:
        await served.close()


async def test_chunked_upload_over_the_limit_gets_413(card) -> None:
    served = await start_served(FrontendConfig(port=0, max_body_bytes=4096))
    served.add(card, EchoEngineClient())
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
                     b"transfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n")
        chunk = b"x" * 1024
        for _ in range(8):  # no content-length: the limit must hold while reading
            writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        resp = await read_response(reader)
        assert resp.status == 413 and resp.json()["error"]["code"] == "request_too_large"
    finally:
        writer.close()
        await served.close()
