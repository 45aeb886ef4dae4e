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
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class CallFormat:
    """How a tool-call parser expects calls written: each call's JSON object is wrapped in
    `call_open`/`call_close`, calls are joined by `separator`, the whole list is wrapped in
    `list_open`/`list_close`, and the arguments sit under `args_key`."""

    args_key: str = "arguments"
    call_open: str = ""
    call_close: str = ""
    separator: str = ""
    list_open: str = ""
    list_close: str = ""


def tool_call_lark(form: CallFormat, tools: list[dict[str, Any]],
                   added_tokens: Mapping[str, int] | None = None, parallel: bool = True) -> str:
    """A Lark grammar for one or more calls in `form`, each one's arguments valid against
    its function's parameters (OpenAI tool dicts). `added_tokens` (text → id) are the
    tokenizer's added tokens: a marker that is one of them must be written as that token
    (llguidance keeps added tokens apart from text), so it appears in the grammar by id.
    `parallel=False` allows exactly one call."""
    added = added_tokens or {}
    options = []
    for tool in tools:
        fn = tool["function"]
        schema = {"type": "object", "properties": {
            "name": {"const": fn["name"]},
            form.args_key: fn.get("parameters") or {"type": "object"}},
            "required": ["name", form.args_key], "additionalProperties": False}
        options.append(f"(%json {json.dumps(schema)})")
    call = _seq(added, form.call_open, "(" + " | ".join(options) + ")", form.call_close)
    more = f"({_seq(added, form.separator, 'call')})*" if parallel else ""
    return (f"start: {_seq(added, form.list_open, 'call', more, form.list_close)}\n"
            f"call: {call}\n")


def _seq(added: Mapping[str, int], *parts: str) -> str:
    """Lark terms in order: rule text as it is, markers as literals or added tokens."""
    out = []
    for part in parts:
        if part:
            rule = part == "call" or part.startswith("(")
            out.append(part if rule else _marker(part, added))
    return " ".join(out)


def _marker(text: str, added: Mapping[str, int]) -> str:
    if text in added:
        return f"<[{added[text]}]>"
    for token, tid in added.items():
        if token and text.startswith(token):
            return f"<[{tid}]> " + _marker(text[len(token):], added)
    return json.dumps(text) if text else ""


def tool_call_format(fmt: CallFormat | None, tools: list[dict[str, Any]],
                     added_tokens: Mapping[str, int] | None = None, parallel: bool = True
                     ) -> dict[str, Any] | None:
    """The response_format that forces calls of `tools` in `fmt` (None: no format known)."""
    if fmt is None or not tools:
        return None
    return {"type": "lark", "lark": tool_call_lark(fmt, tools, added_tokens, parallel)}
