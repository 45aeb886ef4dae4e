"""Streaming a tool call's arguments while the model writes them: call spans and pieces.

A call payload (one JSON object, or an array of them) is read as `{"name": "...",
"arguments"|"parameters": <value>` — name first, then the arguments object or array. For
each such call `call_spans` gives the name and where its arguments' raw text starts and
(once closed) ends. `PieceTracker` turns the spans of a growing payload into
`ToolCallPiece`s: the first piece of a call carries its id and name, the next ones the
arguments text as it grows, and the call's completed `arguments` is that same raw text,
so the pieces of a call always concatenate to its arguments. Payloads written in another
shape (keys in another order, arguments as a string) are not streamed: their calls come
whole when complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from kvflow.llm.parsers._stream import JsonValueScanner

_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_NEXT = re.compile(r"\s*\}\s*(,?)")


class CallSpan(NamedTuple):
    name: str
    start: int  # the arguments' first character in the payload
    end: int | None  # exclusive; None while the arguments are still being written


class ToolCallPiece(NamedTuple):
    """Part of a call being streamed: `index` among the choice's calls; the first piece of a
    call has its `id` and `name`, every piece a part of its `arguments` text (may be "")."""

    index: int
    id: str | None
    name: str | None
    arguments: str


def call_spans(payload: str) -> list[CallSpan]:
    """The calls readable so far in `payload` (an object, or an array of objects)."""
    pos = len(payload) - len(payload.lstrip())
    if payload[pos : pos + 1] == "[":
        pos += 1
    spans: list[CallSpan] = []
    while True:
        head = _HEADER.match(payload, pos)
        if head is None:
            return spans
        name = _unescape(head.group(1))
        scanner = JsonValueScanner()
        scanner.pos = head.end()
        end = scanner.scan(payload)
        if scanner.invalid or (scanner.started and payload[head.end()] not in "[{"):
            return spans
        if end is None:
            spans.append(CallSpan(name, head.end(), None))
            return spans
        spans.append(CallSpan(name, head.end(), end))
        nxt = _NEXT.match(payload, end)
        if nxt is None or not nxt.group(1):
            return spans
        pos = nxt.end()


def _unescape(raw: str) -> str:
    try:
        return json.loads(f'"{raw}"')
    except ValueError:
        return raw


def raw_arguments(payload: str, count: int) -> list[str] | None:
    """The raw arguments text of each of the `count` calls of a complete payload, or None
    when the payload is not in the streamable shape."""
    spans = call_spans(payload)
    if len(spans) != count or any(s.end is None for s in spans):
        return None
    return [payload[s.start : s.end] for s in spans]


@dataclass
class PieceTracker:
    """What was streamed of the calls of the payload in progress (they are numbered from
    `base`, the number of calls the choice completed before it)."""

    base: int = 0
    ids: list[str] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # arguments characters sent, per call

    def update(self, payload: str, new_id, out: list[ToolCallPiece]) -> None:
        for i, span in enumerate(call_spans(payload)):
            if i == len(self.ids):
                self.ids.append(new_id())
                self.sent.append(0)
                out.append(ToolCallPiece(self.base + i, self.ids[i], span.name, ""))
            end = len(payload) if span.end is None else span.end
            text = payload[span.start + self.sent[i] : end]
            if text:
                self.sent[i] += len(text)
                out.append(ToolCallPiece(self.base + i, None, None, text))

    def complete(self, calls: list[tuple[str, str, str]], out: list[ToolCallPiece]
                 ) -> list[str]:
        """Calls (id, name, arguments) of the payload completed: send what is left of each;
        returns their ids (the ones already streamed win over the given ones)."""
        ids = []
        for i, (call_id, name, args) in enumerate(calls):
            if i == len(self.ids):
                self.ids.append(call_id)
                self.sent.append(0)
                out.append(ToolCallPiece(self.base + i, self.ids[i], name, ""))
            if args[self.sent[i] :]:
                out.append(ToolCallPiece(self.base + i, None, None, args[self.sent[i] :]))
            ids.append(self.ids[i])
        self.base += len(calls)
        self.ids, self.sent = [], []
        return ids

    def abandon(self) -> None:
        """The payload in progress was not a call after all (its pieces stand as sent)."""
        self.ids, self.sent = [], []
