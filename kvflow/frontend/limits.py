"""Bounds on hostile input, checked after decoding and before any tokenizing or engine work.

The OpenAI types (kvflow.llm.openai) check each field's type and range; these checks
cover what a single field's schema cannot: how many stop strings, how deep free-form
JSON nests, values that would overflow an engine's 64-bit integers, token ids outside
the vocabulary, how many engine requests one HTTP request starts, and prompts that
cannot fit the context (refused from their length in characters, without tokenizing:
no token is longer than the vocabulary's longest string, so `chars / longest` tokens
is a lower bound; whitespace is not counted, as some pre-tokenizers drop it). Every
failure is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.errors import ApiError, bad_request
from kvflow.frontend.models import ServedModel
from kvflow.llm.openai import ChatCompletionRequest, CompletionRequest, ContentPart
from kvflow.llm.tokenizer import Tokenizer

MAX_JSON_DEPTH = 32  # free-form objects (tool parameters, schemas, template kwargs)
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
# Normalizers may fold a few input characters into one (e.g. Hangul jamo); stay safe.
_CHARS_SLACK = 4
_WHITESPACE = (" ", "\t", "\n", "\r")
_longest_token: dict[str, int] = {}


def check_chat(config: FrontendConfig, model: ServedModel, req: ChatCompletionRequest) -> None:
    _check_common(config, model, req, choices=req.n)
    _check_depth(req.chat_template_kwargs, "chat_template_kwargs")
    for i, tool in enumerate(req.tools or ()):
        _check_depth(tool.function.parameters, f"tools[{i}].function.parameters")
    _check_chars(model, sum(_visible_chars(m.content) for m in req.messages), "messages")


def check_completion(config: FrontendConfig, model: ServedModel, req: CompletionRequest) -> None:
    prompts = 1 if isinstance(req.prompt, str) or _is_ids(req.prompt) else len(req.prompt)
    _check_common(config, model, req, choices=prompts * req.n)
    if isinstance(req.prompt, str):
        _check_chars(model, _visible_chars(req.prompt), "prompt")
    elif _is_ids(req.prompt):
        _check_ids_length(model, len(req.prompt), "prompt")
    else:
        for i, item in enumerate(req.prompt):
            param = f"prompt[{i}]"
            if isinstance(item, str):
                _check_chars(model, _visible_chars(item), param)
            elif isinstance(item, list):
                _check_ids_length(model, len(item), param)


def _is_ids(prompt: list[Any]) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


def _check_common(
    config: FrontendConfig, model: ServedModel, req: ChatCompletionRequest | CompletionRequest,
    choices: int,
) -> None:
    if choices > config.max_choices:
        raise bad_request(
            f"The request asks for {choices} completions (prompts x n); this server allows "
            f"{config.max_choices} per request. Split it into smaller requests.", "n")
    _check_stops(config, req.stop)
    _check_depth(msgspec_builtins(req.response_format), "response_format")
    if req.seed is not None and not -INT64_MAX - 1 <= req.seed <= INT64_MAX - choices:
        raise bad_request("seed must fit a signed 64-bit integer; send a smaller seed.", "seed")
    if req.top_k is not None and req.top_k > INT32_MAX:
        raise bad_request(f"top_k must be at most {INT32_MAX}; use -1 for no top-k.", "top_k")
    _check_stop_ids(config, model.tokenizer, req.stop_token_ids)
    limit = model.context_length
    if req.min_tokens is not None and req.min_tokens > limit:
        raise bad_request(
            f"min_tokens ({req.min_tokens}) exceeds the model's context length ({limit}).",
            "min_tokens")
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if req.min_tokens is not None and max_tokens is not None and req.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({req.min_tokens}) is larger than max_tokens ({max_tokens}); lower "
            "min_tokens or raise max_tokens.", "min_tokens")


def _check_stops(config: FrontendConfig, stop: str | list[str] | None) -> None:
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > config.max_stop_strings:
        raise bad_request(
            f"{len(stops)} stop strings sent; this server allows {config.max_stop_strings}.",
            "stop")
    if any(len(s) > config.max_stop_chars for s in stops):
        raise bad_request(
            f"A stop string is longer than {config.max_stop_chars} characters; shorten it.",
            "stop")


def _check_stop_ids(config: FrontendConfig, tokenizer: Tokenizer, ids: list[int] | None) -> None:
    if not ids:
        return
    if len(ids) > config.max_stop_strings:
        raise bad_request(
            f"{len(ids)} stop_token_ids sent; this server allows {config.max_stop_strings}.",
            "stop_token_ids")
    vocab = tokenizer.vocab_size
    for t in ids:
        if not 0 <= t < vocab:
            raise bad_request(
                f"Token id {t} in stop_token_ids is outside the vocabulary (0..{vocab - 1}).",
                "stop_token_ids")


def msgspec_builtins(value: Any) -> Any:
    """A decoded Struct's free-form part as plain data (None stays None)."""
    return None if value is None else msgspec.to_builtins(value)


def _check_depth(value: Any, param: str) -> None:
    """400 if `value` nests lists/dicts deeper than MAX_JSON_DEPTH (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= MAX_JSON_DEPTH:
            raise bad_request(
                f"{param} nests deeper than {MAX_JSON_DEPTH} levels; flatten it.", param)
        stack.extend((child, depth + 1) for child in children)


def _check_ids_length(model: ServedModel, n: int, param: str) -> None:
    if n >= model.context_length:
        raise _too_long(model, f"{n}", param)


def _visible_chars(content: str | list[ContentPart] | None) -> int:
    """Characters other than spaces, tabs and line breaks (str.count runs in C)."""
    if content is None:
        return 0
    if not isinstance(content, str):
        return sum(_visible_chars(part.text) for part in content)
    return len(content) - sum(content.count(c) for c in _WHITESPACE)


def _check_chars(model: ServedModel, chars: int, param: str) -> None:
    """Refuse a prompt whose length in characters proves it cannot fit, before tokenizing."""
    at_least = chars // (longest_token_chars(model.tokenizer) * _CHARS_SLACK)
    if at_least >= model.context_length:
        raise _too_long(model, f"at least {at_least} (of {chars} characters)", param)


def _too_long(model: ServedModel, size: str, param: str) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {model.context_length} tokens. However, "
        f"you requested more ({size} in the {param}, and at least 1 in the completion). "
        "Shorten the prompt.",
        param=param,
        code="context_length_exceeded",
    )


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """Characters in the vocabulary's longest token string (computed once per tokenizer)."""
    got = _longest_token.get(tokenizer.checksum)
    if got is None:
        vocab = tokenizer.raw.get_vocab(with_added_tokens=True)
        got = _longest_token[tokenizer.checksum] = max(map(len, vocab), default=1) or 1
    return got
