"""Types of the /tokenize and /detokenize utility routes (vLLM-compatible shapes)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from kvflow.llm.openai import ChatMessage


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """Either `prompt` (text, tokenized as /v1/completions does) or `messages` (chat, rendered
    with the model's template as /v1/chat/completions does)."""

    model: str
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(msgspec.Struct, omit_defaults=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str
    tokens: list[int]
    skip_special_tokens: bool = False


class DetokenizeResponse(msgspec.Struct):
    prompt: str
