"""End to end on a real native worker: embeddings, structured output and the other APIs."""

from __future__ import annotations

import base64
import json
import re
import struct

import openai
import pytest

from kvflow.testing.procs import Proc

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 5},
    "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["name", "n"]}


def _ready_url(proc: Proc) -> str:
    proc.wait_for_output("ready at", timeout=90)
    return re.search(r"ready at (http://\S+)", proc.output()).group(1)  # type: ignore[union-attr]


@pytest.mark.slow  # ~80 s here: a worker process importing torch; the same paths run
# in-process in tests/frontend/test_embeddings.py
async def test_native_worker_serves_embeddings_and_guided_json(stack, tmp_path) -> None:
    torch = pytest.importorskip("torch", reason="the native engine needs torch (kvflow[torch])")
    pytest.importorskip("llguidance")
    import transformers

    from kvflow.testing.models import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-llama", "llama")
    proc = stack.start("run", "in=http", "out=native", "--model-path", str(model),
                       "--model-name", "tiny", "--http-port", "0", "--cpu-kv-cache-gb", "0.05")
    base = _ready_url(proc)
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
    try:
        texts = ["hello world", "a second, longer input text"]
        out = await client.embeddings.create(model="tiny", input=texts)
        assert [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens > 0
        hf = transformers.AutoModel.from_pretrained(model, torch_dtype=torch.float32)
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model / "tokenizer.json"))
        for text, item in zip(texts, out.data, strict=True):
            ids = tok(text)["input_ids"]
            with torch.no_grad():
                want = hf(torch.tensor([ids])).last_hidden_state[0, -1]
            want = torch.nn.functional.normalize(want, dim=0)
            assert torch.allclose(torch.tensor(item.embedding), want, atol=1e-4)
        raw = await client.embeddings.create(model="tiny", input="hello world", dimensions=16,
                                             encoding_format="base64")
        vec = struct.unpack("<16f", base64.b64decode(raw.data[0].embedding))
        assert abs(sum(v * v for v in vec) - 1.0) < 1e-4

        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "json please"}], max_tokens=60,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}})
        value = json.loads(chat.choices[0].message.content)
        assert set(value) == {"name", "n"} and 0 <= value["n"] <= 9
    finally:
        await client.close()
