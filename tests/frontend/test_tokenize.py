"""POST /tokenize and /detokenize: the same token ids the generation routes send the engine."""

from __future__ import annotations

import json

from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.testing import EchoEngineClient, raw_request, start_served

MODEL = "test-model"


async def post(served, path: str, body: dict, **headers: str):
    return await raw_request(served.host, served.port, "POST", path, json.dumps(body).encode(),
                             headers)


async def test_tokenize_text_matches_completions(served, echo, tokenizer):
    r = await post(served, "/tokenize", {"model": MODEL, "prompt": "hello world",
                                         "return_token_strs": True})
    assert r.status == 200
    out = r.json()
    await served.client.completions.create(model=MODEL, prompt="hello world", max_tokens=1)
    assert out["tokens"] == echo.requests[-1].token_ids
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] > 0
    assert len(out["token_strs"]) == out["count"]


async def test_tokenize_messages_matches_chat(served, echo):
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    r = await post(served, "/tokenize", {"model": MODEL, "messages": messages})
    await served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert r.json()["tokens"] == echo.requests[-1].token_ids


async def test_detokenize_round_trip(served, echo, tokenizer):
    ids = tokenizer.encode("round trip text")
    r = await post(served, "/detokenize", {"model": MODEL, "tokens": ids})
    assert r.status == 200 and r.json()["prompt"] == tokenizer.decode(ids, skip_special_tokens=False)


async def test_errors(served, echo):
    bad = await post(served, "/detokenize", {"model": MODEL, "tokens": [10**9]})
    assert bad.status == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    both = await post(served, "/tokenize", {"model": MODEL, "prompt": "a",
                                            "messages": [{"role": "user", "content": "a"}]})
    assert both.status == 400
    missing = await post(served, "/tokenize", {"model": "nope", "prompt": "a"})
    assert missing.status == 404


async def test_api_key_is_required_when_configured(card):
    served = await start_served(FrontendConfig(port=0, api_keys=("k",)))
    try:
        served.add(card, EchoEngineClient())
        body = {"model": MODEL, "prompt": "a"}
        assert (await post(served, "/tokenize", body)).status == 401
        assert (await post(served, "/tokenize", body, authorization="Bearer k")).status == 200
    finally:
        await served.close()
