"""kvflow.llm.stop: stop strings over deltas, hold-back, overlaps, and thousands of stops."""

from __future__ import annotations

import itertools
import random
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from kvflow.llm.stop import StopResult, StopStringMatcher


def reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Naive rule: the stop whose first occurrence ends earliest; the longest on a tie."""
    best: tuple[int, int] | None = None
    for stop in filter(None, stops):
        at = text.find(stop)
        if at >= 0:
            key = (at + len(stop), -len(stop))
            best = key if best is None or key < best else best
    if best is None:
        return text, None
    end, length = best[0], -best[1]
    return text[: end if include else end - length], text[end - length : end]


def run(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, str | None]:
    out = []
    for delta in deltas:
        result = matcher.push(delta)
        out.append(result.text)
        if result.stopped:
            return "".join(out), result.matched
    return "".join(out) + matcher.flush(), None


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


alphabet = st.text(alphabet="abc😀 ", max_size=40)
stop_lists = st.lists(st.text(alphabet="abc😀 ", min_size=1, max_size=4), max_size=5)


@settings(max_examples=300, deadline=None)
@given(text=alphabet, stops=stop_lists, cuts=st.lists(st.integers(0, 50)), include=st.booleans())
def test_matches_reference_under_any_chunking(
    text: str, stops: list[str], cuts: list[int], include: bool
) -> None:
    got = run(StopStringMatcher(stops, include_stop_str=include), split(text, cuts))
    assert got == reference(text, stops, include)


@settings(max_examples=200, deadline=None)
@given(text=alphabet, stops=stop_lists)
def test_holds_back_exactly_the_possible_stop_prefix(text: str, stops: list[str]) -> None:
    matcher = StopStringMatcher(stops)
    emitted = ""
    for i, ch in enumerate(text):
        result = matcher.push(ch)
        if result.stopped:
            return
        emitted += result.text
        seen = text[: i + 1]
        held = seen[len(emitted) :]
        assert seen.startswith(emitted)
        longest = max(
            (k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])), default=0
        )
        assert len(held) == longest


def test_stop_spanning_deltas() -> None:
    matcher = StopStringMatcher(["<|end|>"])
    assert matcher.push("Hello <|") == StopResult("Hello ")
    assert matcher.push("en") == StopResult("")
    assert matcher.push("d|> ignored") == StopResult("", True, "<|end|>")
    assert matcher.stopped
    assert matcher.push("more") == StopResult("", True, "<|end|>")
    assert matcher.flush() == ""


def test_false_start_is_released() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("go ST").text == "go "
    assert matcher.push("ART").text == "START"
    assert matcher.push("ST").text == ""
    assert matcher.flush() == "ST"


def test_overlapping_stops() -> None:
    assert run(StopStringMatcher(["ab", "b"]), ["xa", "b"]) == ("x", "ab")
    assert run(StopStringMatcher(["abcd", "bc"]), list("xabcd")) == ("xa", "bc")
    assert run(StopStringMatcher(["aab"]), list("aaab")) == ("a", "aab")


def test_include_stop_str() -> None:
    assert run(StopStringMatcher(["\n\n"], include_stop_str=True), ["a\n", "\nb"]) == (
        "a\n\n", "\n\n")


def test_no_stops_passes_through() -> None:
    matcher = StopStringMatcher(["", ""])
    assert matcher.push("anything") == StopResult("anything")
    assert matcher.flush() == ""


def test_thousands_of_stops() -> None:
    rng = random.Random(7)
    letters = "abcdefghij"
    stops = ["".join(rng.choices(letters, k=rng.randint(5, 12))) for _ in range(5000)]
    # Words of at most 4 letters keep every stop (5+ letters, no spaces) from matching by
    # chance, while still walking deep into the automaton all the time.
    words = ["".join(rng.choices(letters, k=rng.randint(1, 4))) for _ in range(5000)]
    text = " ".join(words[:4000]) + " " + stops[1234] + " " + " ".join(words[4000:])
    deltas = [text[i : i + 4] for i in range(0, len(text), 4)]
    start = time.perf_counter()
    matcher = StopStringMatcher(stops)
    built = time.perf_counter()
    got = run(matcher, deltas)
    done = time.perf_counter()
    assert got == reference(text, stops, False)
    assert got[1] == stops[1234]
    print(
        f"\n5000 stop strings: build {(built - start) * 1e3:.1f} ms, "
        f"{(done - built) / len(got[0]) * 1e6:.2f} us/char over {len(got[0])} chars"
    )
