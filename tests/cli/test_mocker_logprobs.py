"""The mocker answers logprobs requests with plausible logprobs, through real processes."""

from __future__ import annotations

import asyncio
import math

import openai


async def test_mocker_logprobs_chat_and_completions(stack, model_dir) -> None:
    base = stack.frontend()
    stack.start("worker", "--engine", "mocker", "--model-path", str(model_dir), "--model-name", "m",
                "--speedup-ratio", "0", name="worker")
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    for _ in range(300):
        if [x async for x in client.models.list()]:
            break
        await asyncio.sleep(0.05)
    chat = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "tell me about logprobs"}], max_tokens=5,
        logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert -10 < item.logprob < 0 and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == item.logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token != item.top_logprobs[1].token
    comp = await client.completions.create(model="m", prompt="some words here", max_tokens=4, logprobs=3)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(-10 < x < 0 for x in lp.token_logprobs) and all(len(t) >= 2 for t in lp.top_logprobs)
    assert all(math.isfinite(v) for t in lp.top_logprobs for v in t.values())
    await client.close()
