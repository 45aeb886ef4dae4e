"""/v1/completions through the official openai client: prompt forms, echo, n, streaming."""

from __future__ import annotations

import pytest

from kvflow.frontend.testing import EchoEngineClient, Served
from kvflow.llm.tokenizer import Tokenizer

MODEL = "test-model"
PROMPT = "The quick brown fox"


async def test_text_prompt(served: Served, echo: EchoEngineClient, tokenizer: Tokenizer):
    r = await served.client.completions.create(model=MODEL, prompt=PROMPT)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.choices[0].text == PROMPT  # echo engine: the prompt comes back
    assert r.choices[0].finish_reason == "stop"
    # Completions add the tokenizer's special tokens (BOS) to text prompts.
    assert echo.requests[-1].token_ids == tokenizer.encode(PROMPT, add_special_tokens=True)
    assert r.usage.prompt_tokens == len(echo.requests[-1].token_ids)


async def test_token_id_prompt(served: Served, echo: EchoEngineClient, tokenizer: Tokenizer):
    ids = tokenizer.encode("jumps over")
    r = await served.client.completions.create(model=MODEL, prompt=ids)
    assert echo.requests[-1].token_ids == ids
    assert r.choices[0].text == "jumps over"


async def test_batch_of_text_prompts(served: Served, echo: EchoEngineClient):
    r = await served.client.completions.create(model=MODEL, prompt=["one", "two three"], n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == ["one", "one", "two three", "two three"]
    prompt_tokens = len(echo.requests[0].token_ids) + len(echo.requests[-1].token_ids)
    assert r.usage.prompt_tokens == prompt_tokens


async def test_batch_of_token_prompts(served: Served, echo: EchoEngineClient, tokenizer):
    prompts = [tokenizer.encode("lazy dog"), tokenizer.encode("fox")]
    r = await served.client.completions.create(model=MODEL, prompt=prompts)
    assert [c.text for c in r.choices] == ["lazy dog", "fox"]


@pytest.mark.parametrize("stream", [False, True])
async def test_echo(served: Served, echo: EchoEngineClient, stream: bool):
    if not stream:
        r = await served.client.completions.create(model=MODEL, prompt=PROMPT, echo=True,
                                                   max_tokens=3)
        assert r.choices[0].text.startswith(PROMPT)
        assert len(r.choices[0].text) > len(PROMPT)
        return
    s = await served.client.completions.create(model=MODEL, prompt=PROMPT, echo=True, stream=True)
    text = "".join([c.choices[0].text async for c in s])
    assert text == PROMPT + PROMPT


async def test_streaming_with_usage(served: Served, echo: EchoEngineClient):
    s = await served.client.completions.create(
        model=MODEL, prompt=PROMPT, stream=True, max_tokens=4,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in s]
    assert all(c.object == "text_completion" for c in chunks)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4


async def test_stop_strings(served: Served, echo: EchoEngineClient):
    r = await served.client.completions.create(model=MODEL, prompt=PROMPT, stop=[" brown", "x"])
    assert r.choices[0].text == "The quick"
    assert r.choices[0].finish_reason == "stop"


async def test_fields_reach_engine(served: Served, echo: EchoEngineClient):
    await served.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.0, seed=3, top_p=0.5,
        presence_penalty=1.0, frequency_penalty=1.5, logprobs=2,
        extra_body={"top_k": 5, "min_p": 0.1, "ignore_eos": True, "min_tokens": 1,
                    "stop_token_ids": [9], "repetition_penalty": 1.2},
    )
    req = echo.requests[-1]
    s = req.sampling
    assert (s.temperature, s.seed, s.top_p, s.top_k, s.min_p) == (0.0, 3, 0.5, 5, 0.1)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (1.0, 1.5, 1.2)
    assert s.logprobs == 2
    assert (req.stop.max_tokens, req.stop.min_tokens, req.stop.ignore_eos) == (5, 1, True)
    assert req.stop.stop_token_ids == [9]
