"""The cache salt reaches the engine request: body field, header, both; bad ones get 400."""

from __future__ import annotations

import json

import openai
import pytest

from kvflow.frontend.testing import EchoEngineClient, raw_request

MODEL = "test-model"


async def test_cache_salt_from_body_and_header(served, card) -> None:
    engine = EchoEngineClient()
    served.add(card, engine)
    client = served.client
    await client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    await client.completions.create(model=MODEL, prompt="hi", max_tokens=1,
                                    extra_body={"cache_salt": "a"})
    await client.chat.completions.create(model=MODEL, max_tokens=1,
                                         messages=[{"role": "user", "content": "hi"}],
                                         extra_headers={"x-cache-salt": "t1"},
                                         extra_body={"cache_salt": "a"})
    await client.chat.completions.create(model=MODEL, max_tokens=1,
                                         messages=[{"role": "user", "content": "hi"}],
                                         extra_headers={"x-cache-salt": "a"})
    salts = [r.cache_salt for r in engine.requests]
    assert salts == [None, "b:a", "h:t1\nb:a", "h:a"]
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt="hi", extra_body={"cache_salt": ""})
    resp = await raw_request(served.host, served.port, "POST", "/v1/completions",
                             json.dumps({"model": MODEL, "prompt": "hi"}).encode(),
                             {"content-type": "application/json", "x-cache-salt": "x" * 300})
    assert resp.status == 400 and resp.json()["error"]["param"] == "x-cache-salt"
