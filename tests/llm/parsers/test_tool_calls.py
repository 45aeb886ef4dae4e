"""kvflow.llm.parsers.tool_calls: hermes, llama3_json and mistral, whole and streaming."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvflow.llm.parsers.tool_calls import (
    ToolCall,
    ToolParser,
    get_tool_parser,
    random_call_id,
    tool_parser_names,
)


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def summary(content: str | None, calls: list[ToolCall]) -> tuple[str | None, list[tuple]]:
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def stream(parser: ToolParser, deltas: list[str]) -> tuple[str | None, list[tuple]]:
    outs = [parser.push(d) for d in deltas] + [parser.flush()]
    content = "".join(o.content for o in outs)
    return summary(content or None, [c for o in outs for c in o.calls])


WEATHER = ("get_weather", {"city": "巴黎", "unit": "c"})
TIME = ("get_time", {})
CASES = {
    "hermes": [
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "巴黎", '
         '"unit": "c"}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}'
         "</tool_call>\n", "Let me check.", [WEATHER, TIME]),
        ("No tools needed, 1 < 2.", "No tools needed, 1 < 2.", []),
        ('<tool_call>{"name": "get_time", "arguments": {}}', None, [TIME]),
        ("x <tool_call>{not json}</tool_call> y", "x <tool_call>{not json}</tool_call> y", []),
        ("<tool_call>{\"name\": \"get_time\"", '<tool_call>{"name": "get_time"', []),
        ('<tool_call>{"name": "get_time", "parameters": {}}</tool_call> then text',
         "then text", [TIME]),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "巴黎", "unit": "c"}}', None, [WEATHER]),
        ('<|python_tag|>{"name": "get_weather", "arguments": {"city": "巴黎", "unit": "c"}}; '
         '{"name": "get_time", "parameters": {}}', None, [WEATHER, TIME]),
        ("Hello there!", "Hello there!", []),
        ('{"answer": 42}', '{"answer": 42}', []),
        ('{"name": "get_time", "parameters": {}} and more', "and more", [TIME]),
        ('<|python_tag|>{"name": "get_time", "param', '<|python_tag|>{"name": "get_time", "param',
         []),
        ("  <|pyth", "  <|pyth", []),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "巴黎", "unit": "c"}}, '
         '{"name": "get_time", "arguments": {}}]', None, [WEATHER, TIME]),
        ('Sure. [TOOL_CALLS] [{"name": "get_time", "arguments": "{}"}]', "Sure.", [TIME]),
        ('[TOOL_CALLS][{"name": "x", "arguments": {"s": "]}\\" ["}}]', None,
         [("x", {"s": ']}" ['})]),
        ("[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
        ('[TOOL_CALLS][{"name": "get_time"', '[TOOL_CALLS][{"name": "get_time"', []),
        ("plain [TOOL text", "plain [TOOL text", []),
    ],
}
ALL = [(name, *case) for name, cases in CASES.items() for case in cases]


@pytest.mark.parametrize(("name", "text", "content", "calls"), ALL)
def test_parse(name: str, text: str, content: str | None, calls: list[tuple]) -> None:
    result = get_tool_parser(name)().parse(text)
    assert summary(result.content, result.calls) == (content, calls)


@pytest.mark.parametrize(("name", "text", "content", "calls"), ALL)
def test_one_char_at_a_time(name: str, text: str, content: str | None, calls: list[tuple]) -> None:
    assert stream(get_tool_parser(name)(), list(text)) == (content, calls)


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(ALL), cuts=st.lists(st.integers(0, 200), max_size=15))
def test_any_chunking_matches_parse(case: tuple, cuts: list[int]) -> None:
    name, text = case[0], case[1]
    parser = get_tool_parser(name)()
    whole = parser.parse(text)
    assert stream(parser, split(text, cuts)) == summary(whole.content, whole.calls)


noise = st.sampled_from(
    ["<tool_call>", "</tool_call>", '{"name": "f", "arguments": {"a": [1, "}"]}}', "{", "}",
     "[TOOL_CALLS]", "[", "]", ";", " ", "\n", "text", "<", "\\", '"', "<|python_tag|>"]
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(CASES)), text=st.lists(noise, max_size=12).map("".join),
       cuts=st.lists(st.integers(0, 200), max_size=10))
def test_arbitrary_text_never_crashes_and_is_chunking_invariant(
    name: str, text: str, cuts: list[int]
) -> None:
    parser = get_tool_parser(name)()
    whole = parser.parse(text)
    assert stream(parser, split(text, cuts)) == summary(whole.content, whole.calls)


def test_plain_text_passes_through_at_once() -> None:
    parser = get_tool_parser("hermes")()
    assert parser.push("Hello world").content == "Hello world"
    assert parser.push(", all <tool").content == ", all"
    assert parser.push("box> here").content == " <toolbox> here"


def test_complete_call_is_emitted_as_soon_as_it_closes() -> None:
    parser = get_tool_parser("hermes")()
    assert parser.push('<tool_call>{"name": "get_time", ').calls == []
    delta = parser.push('"arguments": {}}</tool_call>')
    assert [c.name for c in delta.calls] == ["get_time"] and delta.content == ""


def test_call_ids() -> None:
    assert re.fullmatch(r"call_[0-9a-f]{24}", random_call_id())
    counter = itertools.count()
    parser = get_tool_parser("mistral")(new_call_id=lambda: f"id{next(counter)}")
    result = parser.parse('[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b"}]')
    assert [(c.id, c.name, c.arguments) for c in result.calls] == [("id0", "a", "{}"),
                                                                   ("id1", "b", "{}")]


def test_registry() -> None:
    assert {"hermes", "llama3_json", "mistral"} <= set(tool_parser_names())
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        get_tool_parser("pythonic-ish")
