"""Structured output: a request's response_format (or forced tool call) → one llguidance grammar.

The frontend validates with `check` (a bad schema is the caller's 400, named by the
grammar library) and engines compile with `grammar_for`; both read the same dict that
travels in `SamplingOptions.response_format`:

- `{"type": "json_object"}`: any JSON object;
- `{"type": "json_schema", "json_schema": {"schema": {...}, "strict": ...}}`: JSON valid
  against the schema (`strict: true` also closes objects that leave additionalProperties
  open, as OpenAI's strict mode requires);
- `{"type": "lark", "lark": "..."}`: a Lark grammar (the frontend's forced tool calls).

JSON is generated compact (no free whitespace), so a model cannot pad it without end.
llguidance is optional: `available()` says whether it is installed here.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

GUIDED_TYPES = frozenset({"json_object", "json_schema", "lark"})
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_MAX_SCHEMA_DEPTH = 64


class GrammarError(ValueError):
    """The response format cannot be turned into a grammar; the message says why."""


def available() -> bool:
    return importlib.util.find_spec("llguidance") is not None


def is_guided(fmt: dict[str, Any] | None) -> bool:
    return bool(fmt) and fmt.get("type") in GUIDED_TYPES  # type: ignore[union-attr]


def grammar_for(fmt: dict[str, Any]) -> str:
    """The llguidance grammar (serialized) that `fmt` asks for. Raises GrammarError."""
    from llguidance import LLMatcher

    kind = fmt.get("type")
    if kind == "lark":
        return LLMatcher.grammar_from_lark(str(fmt.get("lark", "")))
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise GrammarError("response_format.json_schema.schema must be a JSON schema object")
        if spec.get("strict"):
            schema = strict_schema(schema)
    else:
        raise GrammarError(f"response_format type {kind!r} is not a guided format")
    try:
        return LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"the JSON schema is not valid: {exc}") from None


def check(fmt: dict[str, Any]) -> None:
    """Raise GrammarError naming the problem when `fmt` cannot be compiled (no-op when
    llguidance is not installed here: the engine then reports it)."""
    if not available():
        return
    from llguidance import LLMatcher

    grammar = grammar_for(fmt)
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"the response format's schema cannot be used: {error}")


def strict_schema(schema: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """`schema` with additionalProperties false on every object schema that has properties
    and leaves it unset (OpenAI's strict mode)."""
    if depth > _MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the JSON schema nests deeper than {_MAX_SCHEMA_DEPTH} levels")
    out = {k: _strict_value(v, depth) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _strict_value(value: Any, depth: int) -> Any:
    if isinstance(value, dict):
        return strict_schema(value, depth + 1)
    if isinstance(value, list):
        return [_strict_value(v, depth) for v in value]
    return value


def tool_call_lark(open_tag: str, close_tag: str, tools: list[dict[str, Any]]) -> str:
    """A Lark grammar for one or more calls `open_tag {"name": ..., "arguments": {...}}
    close_tag`, each call's arguments valid against its function's parameters."""
    calls = []
    for tool in tools:
        fn = tool["function"]
        schema = {"type": "object", "properties": {
            "name": {"const": fn["name"]},
            "arguments": fn.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}
        calls.append("%json " + json.dumps(schema))
    body = " | ".join(f"({c})" for c in calls)
    return (f"start: call+\ncall: {json.dumps(open_tag)} json_call {json.dumps(close_tag)}\n"
            f"json_call: {body}\n")
