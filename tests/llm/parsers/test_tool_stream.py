"""Streamed tool-call pieces: over random splits of the text, for every tool-call parser,
the pieces of each call concatenate to exactly the call the whole-message parse returns."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kvflow.llm.parsers.tool_calls import get_tool_parser, tool_parser_names
from kvflow.llm.parsers.tool_stream import call_spans

NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True)
LEAVES = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=12) \
    | st.floats(allow_nan=False, allow_infinity=False)
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
ARGS = st.dictionaries(st.text(max_size=8), VALUES, max_size=4)
CALLS = st.lists(st.tuples(NAMES, ARGS), min_size=1, max_size=3)
SEPARATORS = st.sampled_from([(", ", ": "), (",", ":")])
PROSE = st.text(st.characters(blacklist_characters="<[{;"), max_size=20)


def message(parser: str, prose: str, calls: list, seps: tuple[str, str]) -> str:
    dump = lambda v: json.dumps(v, separators=seps)  # noqa: E731
    if parser == "hermes":
        return prose + "".join(
            f"<tool_call>{dump({'name': n, 'arguments': a})}</tool_call>" for n, a in calls)
    if parser == "mistral":
        return prose + "[TOOL_CALLS]" + dump([{"name": n, "arguments": a} for n, a in calls])
    return "; ".join(dump({"name": n, "parameters": a}) for n, a in calls)


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in itertools.pairwise([0, *points, len(text)])]


@settings(max_examples=300, deadline=None)
@given(parser=st.sampled_from(sorted(tool_parser_names())), prose=PROSE, calls=CALLS,
       seps=SEPARATORS, cuts=st.lists(st.integers(0, 10**6), max_size=30))
def test_streamed_pieces_concatenate_to_the_whole_parse(parser, prose, calls, seps, cuts):
    text = message(parser, prose, calls, seps)
    counter = itertools.count()
    stream = get_tool_parser(parser)(new_call_id=lambda: f"id{next(counter)}")
    pieces, done, content = [], [], []
    for piece in split(text, cuts):
        out = stream.push(piece)
        pieces += out.pieces
        done += out.calls
        content.append(out.content)
    tail = stream.flush()
    pieces += tail.pieces
    done += tail.calls
    content.append(tail.content)
    whole = get_tool_parser(parser)().parse(text)

    assert [(c.name, c.arguments) for c in done] == [(c.name, c.arguments) for c in whole.calls]
    assert "".join(content) == (whole.content or "")
    assert [json.loads(c.arguments) for c in done] == [a for _, a in calls]
    for i, call in enumerate(done):
        mine = [p for p in pieces if p.index == i]
        assert mine[0].id == call.id and mine[0].name == call.name  # the header comes first
        assert all(p.id is None and p.name is None for p in mine[1:])
        assert "".join(p.arguments for p in mine) == call.arguments
    assert {p.index for p in pieces} == set(range(len(done)))


def test_arguments_stream_before_the_call_completes():
    parser = get_tool_parser("hermes")(new_call_id=lambda: "call_1")
    first = parser.push('<tool_call>{"name": "get_weather", "arguments": {"city": "Pa')
    assert not first.calls
    assert [(p.id, p.name, p.arguments) for p in first.pieces] == [
        ("call_1", "get_weather", ""), (None, None, '{"city": "Pa')]
    second = parser.push('ris"}}</tool_call>')
    assert [p.arguments for p in second.pieces] == ['ris"}']
    assert second.calls[0].arguments == '{"city": "Paris"}'


def test_call_spans_of_a_growing_array():
    payload = '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "parameters": [1, '
    spans = call_spans(payload)
    assert [(s.name, payload[s.start : s.end]) for s in spans[:1]] == [("a", '{"x": 1}')]
    assert spans[1].name == "b" and spans[1].end is None
    assert call_spans('{"arguments": {}, "name": "late"}') == []  # other key order: not streamed
