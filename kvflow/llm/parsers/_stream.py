"""Streaming text helpers: markers split across deltas, and JSON values arriving in pieces."""

from __future__ import annotations

import re

_WS = re.compile(r"\s*")
_OUTSIDE_STRING = re.compile(r'["\[\]{}]')
_INSIDE_STRING = re.compile(r'["\\]')


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def partial_suffix_any(text: str, markers: tuple[str, ...]) -> int:
    """The longest `partial_suffix` over several markers."""
    return max((partial_suffix(text, m) for m in markers), default=0)


class JsonValueScanner:
    """Finds where one JSON object or array ends in a growing buffer, string- and escape-aware.

    Call `scan(buffer)` after each append (the buffer may only grow between calls); it
    returns the end index (exclusive) once the value is closed, else None. If the first
    non-space character is not `{` or `[`, `invalid` becomes True.
    """

    __slots__ = ("depth", "in_string", "invalid", "pos", "started")

    def __init__(self) -> None:
        self.pos = 0
        self.depth = 0
        self.in_string = False
        self.started = False
        self.invalid = False

    def scan(self, text: str) -> int | None:
        if not self.started and not self._start(text):
            return None
        while True:
            if self.in_string:
                if not self._leave_string(text):
                    return None
                continue
            found = _OUTSIDE_STRING.search(text, self.pos)
            if found is None:
                self.pos = len(text)
                return None
            self.pos = found.end()
            if self._close(found.group()):
                return self.pos

    def _start(self, text: str) -> bool:
        first = _WS.match(text, self.pos).end()  # type: ignore[union-attr]
        self.pos = first
        if first == len(text):
            return False
        if text[first] not in "[{":
            self.invalid = True
            return False
        self.started = True
        return True

    def _leave_string(self, text: str) -> bool:
        """Advance past an escape or the closing quote; False if more text is needed."""
        found = _INSIDE_STRING.search(text, self.pos)
        if found is None:
            self.pos = len(text)
            return False
        if found.group() == "\\":
            if found.end() >= len(text):
                self.pos = found.start()
                return False
            self.pos = found.end() + 1
            return True
        self.in_string = False
        self.pos = found.end()
        return True

    def _close(self, ch: str) -> bool:
        """Track one structural character; True when the top-level value just closed."""
        if ch == '"':
            self.in_string = True
            return False
        self.depth += 1 if ch in "[{" else -1
        return self.depth == 0
