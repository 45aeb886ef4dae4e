"""Tool-call result types, the parser registry and the streaming base class every tool parser uses.

Whitespace policy (the same streaming or not): whitespace right before and right after a
tool call is dropped, so "Let me look.\\n<tool_call>…</tool_call>\\n" gives the content
"Let me look.". Content keeps trailing whitespace back until the next non-space text shows
whether a tool call follows.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvflow.llm.parsers.registry import Registry
from kvflow.llm.parsers.tool_stream import PieceTracker, ToolCallPiece, raw_arguments
from kvflow.llm.structured import CallFormat


def random_call_id() -> str:
    """An OpenAI-style tool call id: "call_" and 24 random hex characters."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One complete call; `arguments` is a JSON text, as in the OpenAI API."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolParseResult:
    """A whole message split: `content` is None when nothing but calls was written."""

    content: str | None
    calls: list[ToolCall]


class ToolDelta(NamedTuple):
    """What one streamed delta released: plain text, calls that just completed, and the
    pieces of calls as they are written (see tool_stream.py)."""

    content: str
    calls: list[ToolCall]
    pieces: list[ToolCallPiece] = []


_REGISTRY: Registry[ToolParser] = Registry("tool call parser")


def register_tool_parser(
    name: str, *aliases: str
) -> Callable[[type[ToolParser]], type[ToolParser]]:
    """Class decorator registering a tool-call parser under `name` (and aliases)."""
    return _REGISTRY.register(name, *aliases)


@dataclass
class Collected:
    """Output gathered while one push or flush runs."""

    content: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    pieces: list[ToolCallPiece] = field(default_factory=list)

    def delta(self) -> ToolDelta:
        return ToolDelta("".join(self.content), self.calls, self.pieces)


class ToolParser:
    """Base class: content gating and call building; subclasses implement `_step`/`_finish`."""

    # How calls are written, for guided decoding of forced calls (None: not known).
    call_format: CallFormat | None = None

    def __init__(self, *, new_call_id: Callable[[], str] = random_call_id) -> None:
        self.new_call_id = new_call_id
        self._buf = ""
        self._held_ws = ""  # trailing whitespace of content, dropped if a call follows
        self._after_call = False  # drop leading whitespace of the next content
        self._tracker = PieceTracker()

    def parse(self, text: str) -> ToolParseResult:
        """Split a whole message (does not touch this parser's streaming state)."""
        fresh = type(self)(new_call_id=self.new_call_id)
        first, last = fresh.push(text), fresh.flush()
        content = first.content + last.content
        return ToolParseResult(content or None, first.calls + last.calls)

    def push(self, delta: str) -> ToolDelta:
        """Split one delta into plain text to emit now and calls that completed."""
        self._buf += delta
        out = Collected()
        while self._step(out):
            pass
        payload = self._payload()
        if payload is not None:
            self._tracker.update(payload, self.new_call_id, out.pieces)
        return out.delta()

    def _payload(self) -> str | None:
        """The text of the call being written, from its JSON's start (None: not in one)."""
        return None

    def flush(self) -> ToolDelta:
        """End of stream: an unfinished call is returned as plain text."""
        out = Collected()
        self._finish(out)
        self._buf = ""
        out.content.append(self._held_ws)
        self._held_ws = ""
        return out.delta()

    def _step(self, out: Collected) -> bool:
        """Consume what it can of self._buf; True to be called again."""
        raise NotImplementedError

    def _finish(self, out: Collected) -> None:
        """Release self._buf at end of stream."""
        raise NotImplementedError

    def _content(self, piece: str, out: Collected) -> None:
        """Emit plain text, holding its trailing whitespace back."""
        if self._after_call:
            piece = piece.lstrip()
            self._after_call = not piece
        if not piece:
            return
        piece = self._held_ws + piece
        body = piece.rstrip()
        self._held_ws = piece[len(body) :]
        out.content.append(body)

    def _calls(self, calls: list[ToolCall], out: Collected, payload: str | None = None) -> None:
        """Emit completed calls (arguments as the model wrote them when `payload` has the
        streamable shape); the whitespace around them is dropped."""
        raw = raw_arguments(payload, len(calls)) if payload is not None else None
        if raw is not None:
            calls = [ToolCall(c.id, c.name, args) for c, args in zip(calls, raw, strict=True)]
        ids = self._tracker.complete([(c.id, c.name, c.arguments) for c in calls], out.pieces)
        out.calls.extend(ToolCall(i, c.name, c.arguments) for i, c in zip(ids, calls, strict=True))
        self._held_ws = ""
        self._after_call = True

    def _build_calls(self, payload: Any) -> list[ToolCall] | None:
        """Calls from a decoded JSON object or list of objects; None if any is not a call."""
        items = payload if isinstance(payload, list) else [payload]
        calls = [self._build_call(item) for item in items]
        if not calls or any(c is None for c in calls):
            return None
        return [c for c in calls if c is not None]

    def _build_call(self, item: Any) -> ToolCall | None:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return ToolCall(self.new_call_id(), item["name"], text)


def decode_json(text: str) -> Any | None:
    """The JSON value of `text`, or None if it is not valid JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def tool_parser_registry() -> Registry[ToolParser]:
    return _REGISTRY
