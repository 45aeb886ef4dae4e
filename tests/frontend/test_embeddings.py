"""POST /v1/embeddings (and guided JSON) through the official openai client, on a real
in-process native engine with a random-weight model, checked against transformers."""

from __future__ import annotations

import base64
import json
import struct

import msgspec
import openai
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvflow.frontend.testing import EchoEngineClient, start_served  # noqa: E402
from kvflow.llm.model_card import build_model_card  # noqa: E402
from kvflow.testing.engine_io import small_native_engine  # noqa: E402
from kvflow.testing.models import make_tiny_model  # noqa: E402

MODEL = "tiny"
ATOL = 1e-4  # float32 on CPU; see tests/engines/native/test_embeddings.py


class LocalEngine:
    """An in-process engine as the frontend's EngineClient (one live worker)."""

    def __init__(self, engine) -> None:
        self.generate = engine.generate

    def live_workers(self) -> int:
        return 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("emb") / "m", "llama")


@pytest.fixture
async def native(tiny_dir):
    engine = await small_native_engine(tiny_dir, max_model_len=512)
    served = await start_served()
    card = build_model_card(str(tiny_dir), model_name=MODEL,
                            model_types=("chat", "completions", "embedding"))
    served.add(msgspec.structs.replace(card, guided_decoding=True), LocalEngine(engine))
    try:
        yield served
    finally:
        await served.close()
        await engine.stop()


def reference(model_dir, text: str, pooling: str = "last"):
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    hf = transformers.AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        hidden = hf(torch.tensor([tok(text)["input_ids"]])).last_hidden_state[0]
    v = hidden.mean(dim=0) if pooling == "mean" else hidden[-1]
    return torch.nn.functional.normalize(v, dim=0)


async def test_embeddings_match_transformers(native, tiny_dir):
    texts = ["hello world", "a second and somewhat longer input"]
    out = await native.client.embeddings.create(model=MODEL, input=texts)
    assert out.object == "list" and out.model == MODEL
    for text, item in zip(texts, out.data, strict=True):
        assert torch.allclose(torch.tensor(item.embedding), reference(tiny_dir, text),
                              atol=ATOL)
    mean = await native.client.embeddings.create(model=MODEL, input=texts[1],
                                                 extra_body={"pooling": "mean"})
    assert torch.allclose(torch.tensor(mean.data[0].embedding),
                          reference(tiny_dir, texts[1], "mean"), atol=ATOL)


async def test_base64_and_dimensions(native):
    plain = await native.client.embeddings.create(model=MODEL, input="hello", dimensions=8)
    raw = await native.client.embeddings.create(model=MODEL, input="hello", dimensions=8,
                                                encoding_format="base64")
    decoded = struct.unpack("<8f", base64.b64decode(raw.data[0].embedding))
    assert torch.allclose(torch.tensor(decoded), torch.tensor(plain.data[0].embedding))
    assert abs(sum(v * v for v in decoded) - 1.0) < 1e-4


async def test_token_id_inputs_and_usage(native):
    out = await native.client.embeddings.create(model=MODEL, input=[[5, 6, 7], [8, 9]])
    assert len(out.data) == 2 and out.usage.prompt_tokens == 5


async def test_guided_json_through_chat(native):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["ok", "n"]}
    for seed in range(3):
        r = await native.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "json"}], max_tokens=40,
            seed=seed, temperature=1.0, response_format={
                "type": "json_schema", "json_schema": {"name": "t", "schema": schema,
                                                       "strict": True}})
        assert set(json.loads(r.choices[0].message.content)) == {"ok", "n"}


async def test_models_without_embeddings_are_refused(card):
    served = await start_served()
    try:
        served.add(card, EchoEngineClient())
        with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
            await served.client.embeddings.create(model="test-model", input="x")
    finally:
        await served.close()
