"""Guided decoding in the native engine: 100 constrained generations on a random-weight model
all parse and validate; bad schemas fail the request with a message naming the problem."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from kvflow.llm.tokenizer import Tokenizer  # noqa: E402
from kvflow.testing.engine_io import (  # noqa: E402
    collect,
    greedy_request,
    prompt_ids,
    small_native_engine,
    tokens,
)

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3}},
     "required": ["ok", "color", "tags"]},
    {"type": "object", "properties": {
        "point": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": -9, "maximum": 9},
            "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"]},
        "label": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]}},
     "required": ["point", "label"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 500},
     "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"kind": {"const": "event"},
                                      "level": {"type": "integer", "enum": [1, 2, 3]}},
     "required": ["kind", "level"]},
]


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def model_path(tiny_models):
    return tiny_models("llama")


async def test_100_constrained_generations_parse_and_validate(model_path):
    engine = await small_native_engine(model_path, max_model_len=512)
    tok = Tokenizer.from_dir(model_path)
    try:
        jobs = []
        for i in range(100):
            schema = SCHEMAS[i % len(SCHEMAS)]
            req = greedy_request(f"g{i}", prompt_ids(6, seed=i), max_tokens=200,
                                 temperature=1.0, seed=i, response_format=fmt(schema))
            jobs.append((schema, req))
        outs = await asyncio.gather(*(collect(engine, req) for _, req in jobs))
        for (schema, req), out in zip(jobs, outs, strict=True):
            assert out[-1].finish_reason == "stop", (req.request_id, out[-1])
            value = json.loads(tok.decode(tokens(out)))
            jsonschema.validate(value, schema)
    finally:
        await engine.stop()


async def test_json_object_and_unguided_rows_in_one_batch(model_path):
    engine = await small_native_engine(model_path, max_model_len=512)
    tok = Tokenizer.from_dir(model_path)
    try:
        guided = [greedy_request(f"o{i}", prompt_ids(5, seed=50 + i), max_tokens=300,
                                 temperature=0.7, seed=i, response_format={"type": "json_object"})
                  for i in range(6)]
        plain = greedy_request("plain", prompt_ids(5, seed=1), max_tokens=20)
        reference = tokens(await collect(engine, plain))
        outs = await asyncio.gather(*(collect(engine, r) for r in [*guided, plain]))
        # Random weights write strings of any length: some objects are still open at
        # max_tokens. Every one that ended is a JSON object.
        ended = [out for out in outs[:-1] if out[-1].finish_reason == "stop"]
        assert len(ended) >= 3
        for out in ended:
            assert isinstance(json.loads(tok.decode(tokens(out))), dict)
        assert tokens(outs[-1]) == reference  # an unguided row is untouched by its neighbours
    finally:
        await engine.stop()


async def test_bad_grammar_fails_the_request_with_the_reason(model_path):
    engine = await small_native_engine(model_path)
    try:
        bad = {"type": "json_schema", "json_schema": {"schema": {"type": "string",
                                                                 "pattern": "(("}}}
        out = await collect(engine, greedy_request("bad", prompt_ids(4, seed=0), 8,
                                                   response_format=bad))
        assert out[-1].finish_reason == "error" and "unclosed group" in (out[-1].error or "")
    finally:
        await engine.stop()


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "set_alarm", "parameters": {
        "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0,
                                                  "maximum": 23}},
        "required": ["hour"], "additionalProperties": False}}},
]


@pytest.mark.parametrize(("parser", "parallel"), [("hermes", True), ("hermes", False),
                                                  ("mistral", False), ("llama3_json", False)])
async def test_forced_tool_calls_parse_and_match_their_schemas(model_path, parser, parallel):
    from kvflow.llm.parsers.tool_calls import get_tool_parser
    from kvflow.llm.structured import tool_call_format

    cls = get_tool_parser(parser)
    tok = Tokenizer.from_dir(model_path)
    fmt = tool_call_format(cls.call_format, TOOLS, tok.added_tokens(), parallel)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    engine = await small_native_engine(model_path, max_model_len=512)
    try:
        reqs = [greedy_request(f"{parser}{i}", prompt_ids(6, seed=i), max_tokens=300,
                               temperature=0.8, seed=i, response_format=fmt) for i in range(4)]
        outs = await asyncio.gather(*(collect(engine, r) for r in reqs))
        for out in outs:
            assert out[-1].finish_reason == "stop"
            text = tok.decode([t for t in tokens(out) if t != 1], skip_special_tokens=False)
            parsed = cls().parse(text)
            assert parsed.calls and not (parsed.content or "").strip(), parsed
            assert parallel or len(parsed.calls) == 1
            for call in parsed.calls:
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    finally:
        await engine.stop()
