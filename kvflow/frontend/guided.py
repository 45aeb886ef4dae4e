"""Structured output on the frontend side: response_format checked, forced tool calls as a grammar.

What the engine enforces is a `response_format` dict in SamplingOptions
(`kvflow.llm.structured`); here a bad schema becomes the caller's 400 (named by the
grammar library), and tool_choice "required" or a named function becomes a grammar in
the model's tool-call format, on engines whose card announces guided decoding.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvflow.frontend.errors import bad_request
from kvflow.frontend.models import ServedModel
from kvflow.llm import structured
from kvflow.llm.openai import ChatCompletionRequest
from kvflow.llm.protocol import PreprocessedRequest


def check_response_format(fmt: dict[str, Any] | None) -> None:
    if not structured.is_guided(fmt):
        return
    assert fmt is not None
    try:
        structured.check(fmt)
    except structured.GrammarError as exc:
        raise bad_request(f"Invalid response_format: {exc}.", param="response_format",
                          code="invalid_response_format") from None


def force_tool_calls(model: ServedModel, req: ChatCompletionRequest, base: PreprocessedRequest
                      ) -> PreprocessedRequest:
    """tool_choice "required" or a named function, on an engine with guided decoding: the
    output is constrained to calls in the tool parser's format, arguments valid against the
    tool's parameters schema."""
    forced = req.tool_choice == "required" or not isinstance(req.tool_choice, str | None)
    if not forced or not model.card.guided_decoding or base.sampling.response_format:
        return base
    assert model.tool_parser is not None and req.tools is not None
    tools = msgspec.to_builtins(req.tools)
    if not isinstance(req.tool_choice, str | None):
        tools = [t for t in tools if t["function"]["name"] == req.tool_choice.function.name]
    fmt = structured.tool_call_format(model.tool_parser.call_format, tools,
                                      model.tokenizer.added_tokens(),
                                      parallel=req.parallel_tool_calls is not False)
    if fmt is None:
        return base
    try:
        structured.check(fmt)
    except structured.GrammarError as exc:
        raise bad_request(f"Invalid tool parameters schema: {exc}.", param="tools",
                          code="invalid_tool_schema") from None
    sampling = msgspec.structs.replace(base.sampling, response_format=fmt)
    return msgspec.structs.replace(base, sampling=sampling)
