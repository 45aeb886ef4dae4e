"""kvflow.llm.parsers.reasoning: <think> splitting, whole and streaming, under any chunking."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvflow.llm.parsers.reasoning import (
    ReasoningDelta,
    ReasoningParser,
    ReasoningResult,
    ThinkReasoningParser,
    get_reasoning_parser,
    reasoning_parser_names,
)


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def stream(parser: ReasoningParser, deltas: list[str]) -> ReasoningResult:
    outs = [parser.push(d) for d in deltas] + [parser.flush()]
    reasoning = "".join(o.reasoning for o in outs)
    return ReasoningResult(reasoning or None, "".join(o.content for o in outs))


CASES = [
    ("<think>\nI should add.\n</think>\n\nIt is 4.", False, "I should add.", "It is 4."),
    ("I should add.\n</think>\n\nIt is 4.", True, "I should add.", "It is 4."),
    ("It is 4.", False, None, "It is 4."),
    ("<think>still thinking ", False, "still thinking", ""),
    ("<think>\n\n</think>\n\nHi", False, None, "Hi"),
    ("a < b and <thin k> stays", False, None, "a < b and <thin k> stays"),
    ("<think>x < y </thi", False, "x < y </thi", ""),
    ("思考<think>中文 🤔</think>答案", False, "中文 🤔", "思考答案"),
]


@pytest.mark.parametrize(("text", "inside", "reasoning", "content"), CASES)
def test_parse(text: str, inside: bool, reasoning: str | None, content: str) -> None:
    parser = ThinkReasoningParser(in_reasoning=inside)
    assert parser.parse(text) == ReasoningResult(reasoning, content)


@pytest.mark.parametrize(("text", "inside", "reasoning", "content"), CASES)
def test_one_char_at_a_time(text: str, inside: bool, reasoning: str | None, content: str) -> None:
    assert stream(ThinkReasoningParser(in_reasoning=inside), list(text)) == ReasoningResult(
        reasoning, content)


pieces = st.sampled_from(
    ["<think>", "</think>", "<", "</", "think", ">", " ", "\n", "word", "字", "🙂", "<th"]
)


@settings(max_examples=300, deadline=None)
@given(text=st.lists(pieces, max_size=20).map("".join), cuts=st.lists(st.integers(0, 80)),
       inside=st.booleans())
def test_any_chunking_matches_parse(text: str, cuts: list[int], inside: bool) -> None:
    parser = ThinkReasoningParser(in_reasoning=inside)
    assert stream(parser, split(text, cuts)) == parser.parse(text)


def test_markers_split_across_deltas_are_held() -> None:
    parser = ThinkReasoningParser()
    assert parser.push("Hi <th") == ReasoningDelta("", "Hi ")
    assert parser.push("ink>deep") == ReasoningDelta("deep", "")
    assert parser.push(" thought </") == ReasoningDelta(" thought", "")
    assert parser.push("think> Done") == ReasoningDelta("", "Done")
    assert parser.flush() == ReasoningDelta("", "")


def test_prompt_opens_reasoning() -> None:
    assert ThinkReasoningParser.prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not ThinkReasoningParser.prompt_opens_reasoning("assistant\n<think>\n\n</think>\n\n")
    assert not ThinkReasoningParser.prompt_opens_reasoning("<|im_start|>assistant\n")


def test_registry_names_and_aliases() -> None:
    for name in ("think", "deepseek_r1", "qwen3"):
        assert get_reasoning_parser(name) is ThinkReasoningParser
    assert {"think", "deepseek_r1", "qwen3"} <= set(reasoning_parser_names())
    with pytest.raises(ValueError, match="deepseek_r1"):
        get_reasoning_parser("o1")


def test_parse_does_not_disturb_streaming_state() -> None:
    parser = ThinkReasoningParser()
    parser.push("<think>abc")
    assert parser.parse("plain").content == "plain"
    assert parser.push("</think>x") == ReasoningDelta("", "x")
