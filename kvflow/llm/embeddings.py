"""OpenAI embeddings API types: the /v1/embeddings request and response."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from kvflow.llm.openai import Prompt


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """Body of POST /v1/embeddings. `input`: text, texts, token ids, or lists of ids.
    `pooling` and `normalize` are kvflow extensions (defaults: last token, unit length)."""

    model: str
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None
    pooling: Literal["last", "mean"] = "last"
    normalize: bool = True


class EmbeddingData(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct):
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
    object: str = "list"
