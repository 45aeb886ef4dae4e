"""Stop strings on a stream of text deltas, with hold-back of text that may begin a stop string.

The matcher is an Aho-Corasick automaton over all stop strings, fed one character at a time,
so the cost per character does not depend on how many stop strings there are. The automaton
state also says how much to hold back: its depth is the length of the longest suffix of the
text so far that is a prefix of some stop string.

Matching rule (independent of how the stream is chunked): generation stops at the first
position where any stop string ends; if several end there, the longest one wins. The text
before it is released (plus the stop string itself when `include_stop_str`).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple


class StopResult(NamedTuple):
    """What a push released: `text` is safe to emit; `stopped` once a stop string matched."""

    text: str
    stopped: bool = False
    matched: str | None = None


class _Match(NamedTuple):
    end: int
    length: int


class _Automaton:
    """Aho-Corasick trie: goto edges, failure links, depth and longest stop ending per node."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.depth: list[int] = [0]
        self.match_len: list[int] = [0]
        for stop in stops:
            self._insert(stop)
        self.fail: list[int] = [0] * len(self.goto)
        self._link()

    def _insert(self, stop: str) -> None:
        node = 0
        for ch in stop:
            nxt = self.goto[node].get(ch)
            if nxt is None:
                nxt = len(self.goto)
                self.goto.append({})
                self.depth.append(self.depth[node] + 1)
                self.match_len.append(0)
                self.goto[node][ch] = nxt
            node = nxt
        self.match_len[node] = len(stop)

    def _link(self) -> None:
        """Breadth-first: failure links, and inherit the longest match through them."""
        queue = deque(self.goto[0].values())
        while queue:
            node = queue.popleft()
            for ch, child in self.goto[node].items():
                self.fail[child] = self.step(self.fail[node], ch)
                if not self.match_len[child]:
                    self.match_len[child] = self.match_len[self.fail[child]]
                queue.append(child)

    def step(self, node: int, ch: str) -> int:
        goto, fail = self.goto, self.fail
        while node and ch not in goto[node]:
            node = fail[node]
        return goto[node].get(ch, 0)


class StopStringMatcher:
    """Feed text deltas with `push`; emit `result.text`; stop when `result.stopped`."""

    def __init__(self, stops: Sequence[str], include_stop_str: bool = False) -> None:
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self.include_stop_str = include_stop_str
        self.max_stop_len = max((len(s) for s in self.stops), default=0)
        self._auto = _Automaton(self.stops)
        first_chars = sorted({s[0] for s in self.stops})
        self._starts = re.compile("|".join(map(re.escape, first_chars)) or "(?!)")
        self._node = 0
        self._held = ""
        self._result: StopResult | None = None

    @property
    def stopped(self) -> bool:
        return self._result is not None

    def push(self, delta: str) -> StopResult:
        """Add a delta; return the text now safe to emit, and whether a stop string matched."""
        if self._result is not None:
            return StopResult("", True, self._result.matched)
        if not self.stops:
            return StopResult(delta)
        text = self._held + delta
        match = self._scan(text, len(self._held))
        if match is None:
            keep = self._auto.depth[self._node]
            self._held = text[len(text) - keep :] if keep else ""
            return StopResult(text[: len(text) - keep])
        return self._finish(text, match)

    def flush(self) -> str:
        """End of stream: release any held-back text."""
        held, self._held = self._held, ""
        return "" if self._result is not None else held

    def _finish(self, text: str, match: _Match) -> StopResult:
        end, length = match
        matched = text[end - length : end]
        self._result = StopResult(
            text[: end if self.include_stop_str else end - length], True, matched
        )
        self._held = ""
        return self._result

    def _scan(self, text: str, start: int) -> _Match | None:
        """Advance the automaton over text[start:]; the first stop string that ends, if any."""
        auto, node, i, n = self._auto, self._node, start, len(text)
        while i < n:
            if node == 0:
                found = self._starts.search(text, i)
                if found is None:
                    break
                i = found.start()
            node = auto.step(node, text[i])
            i += 1
            if auto.match_len[node]:
                self._node = node
                return _Match(i, auto.match_len[node])
        self._node = node
        return None
