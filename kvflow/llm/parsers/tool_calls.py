"""Tool-call parsers by name: "hermes", "llama3_json" and "mistral", whole-message or streaming.

    parser = get_tool_parser("hermes")()
    for delta in deltas:
        out = parser.push(delta)      # ToolDelta(content=..., calls=[ToolCall, ...])
    out = parser.flush()

Plain text is released at once; text that may begin a call is held back; a call's arguments
stream as pieces while it is written (tool_stream.py) and the call is emitted
whole when it completes. A call whose JSON is malformed comes back as plain text.
"""

from __future__ import annotations

from collections.abc import Callable

from kvflow.llm.parsers._stream import JsonValueScanner, partial_suffix
from kvflow.llm.parsers.tool_base import (
    Collected,
    ToolCall,
    ToolDelta,
    ToolParser,
    ToolParseResult,
    decode_json,
    random_call_id,
    register_tool_parser,
    tool_parser_registry,
)
from kvflow.llm.structured import CallFormat

__all__ = [
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "ToolCall",
    "ToolDelta",
    "ToolParseResult",
    "ToolParser",
    "get_tool_parser",
    "random_call_id",
    "register_tool_parser",
    "tool_parser_names",
]


def get_tool_parser(name: str) -> type[ToolParser]:
    """The tool parser class registered as `name`; ValueError listing the known names."""
    return tool_parser_registry().get(name)


def tool_parser_names() -> list[str]:
    return tool_parser_registry().names()


class _MarkerToolParser(ToolParser):
    """Calls start with a marker; plain text runs until the next marker."""

    start_marker = ""

    def __init__(self, *, new_call_id: Callable[[], str] = random_call_id) -> None:
        super().__init__(new_call_id=new_call_id)
        self._in_call = False

    def _step(self, out: Collected) -> bool:
        if self._in_call:
            return self._step_call(out)
        at = self._buf.find(self.start_marker)
        if at < 0:
            cut = len(self._buf) - partial_suffix(self._buf, self.start_marker)
            self._content(self._buf[:cut], out)
            self._buf = self._buf[cut:]
            return False
        self._content(self._buf[:at], out)
        self._buf = self._buf[at + len(self.start_marker) :]
        self._in_call = True
        self._begin_call()
        return True

    def _payload(self) -> str | None:
        return self._buf if self._in_call else None

    def _end_call(self, payload: str, raw: str, rest: str, out: Collected) -> None:
        """A call's text is complete: emit its calls, or its raw text if malformed."""
        self._buf = rest
        self._in_call = False
        calls = self._build_calls(decode_json(payload))
        if calls is None:
            self._tracker.abandon()
            self._content(raw, out)
        else:
            self._calls(calls, out, payload)

    def _begin_call(self) -> None:
        """Reset per-call scanning state."""

    def _step_call(self, out: Collected) -> bool:
        raise NotImplementedError


@register_tool_parser("hermes")
class HermesToolParser(_MarkerToolParser):
    """`<tool_call>{"name": …, "arguments": {…}}</tool_call>`, any number per message."""

    start_marker = "<tool_call>"
    end_marker = "</tool_call>"
    call_format = CallFormat(call_open=start_marker, call_close=end_marker)

    def _begin_call(self) -> None:
        self._search_from = 0

    def _step_call(self, out: Collected) -> bool:
        at = self._buf.find(self.end_marker, self._search_from)
        if at < 0:
            self._search_from = max(0, len(self._buf) - len(self.end_marker) + 1)
            return False
        payload = self._buf[:at]
        raw = self.start_marker + payload + self.end_marker
        self._end_call(payload, raw, self._buf[at + len(self.end_marker) :], out)
        return True

    def _finish(self, out: Collected) -> None:
        if not self._in_call:
            self._content(self._buf, out)
            return
        # The model may stop right after the JSON, before writing the end marker.
        self._end_call(self._buf, self.start_marker + self._buf, "", out)


@register_tool_parser("mistral")
class MistralToolParser(_MarkerToolParser):
    """`[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`."""

    start_marker = "[TOOL_CALLS]"
    call_format = CallFormat(list_open=start_marker + "[", list_close="]", separator=",")

    def _begin_call(self) -> None:
        self._scanner = JsonValueScanner()

    def _step_call(self, out: Collected) -> bool:
        end = self._scanner.scan(self._buf)
        if self._scanner.invalid:
            self._in_call = False
            self._tracker.abandon()
            self._content(self.start_marker, out)
            return True
        if end is None:
            return False
        payload = self._buf[:end]
        self._end_call(payload, self.start_marker + payload, self._buf[end:], out)
        return True

    def _finish(self, out: Collected) -> None:
        if self._in_call:
            self._tracker.abandon()
            self._content(self.start_marker, out)
        self._content(self._buf, out)


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    """A message that is a JSON call `{"name": …, "parameters"|"arguments": …}`, or several
    separated by `;`, optionally after `<|python_tag|>`. Any other message is plain text."""

    python_tag = "<|python_tag|>"
    call_format = CallFormat(args_key="parameters", separator=";")

    def __init__(self, *, new_call_id: Callable[[], str] = random_call_id) -> None:
        super().__init__(new_call_id=new_call_id)
        self._state = "start"  # start -> calls -> (separator -> calls)* ; or -> text
        self._tag = ""
        self._scanner = JsonValueScanner()

    def _step(self, out: Collected) -> bool:
        if self._state == "text":
            self._content(self._buf, out)
            self._buf = ""
            return False
        if self._state == "start":
            return self._step_start()
        if self._state == "separator":
            return self._step_separator(out)
        return self._step_call(out)

    def _step_start(self) -> bool:
        head = self._buf.lstrip()
        if not head or (self.python_tag.startswith(head) and head != self.python_tag):
            return False
        if head.startswith(self.python_tag):
            self._tag, self._buf = self.python_tag, head[len(self.python_tag) :]
            self._state = "calls"
        else:
            self._state = "calls" if head[0] == "{" else "text"
        return True

    def _step_call(self, out: Collected) -> bool:
        end = self._scanner.scan(self._buf)
        if self._scanner.invalid:
            return self._to_text()
        if end is None:
            return False
        calls = self._build_calls(decode_json(self._buf[:end]))
        if calls is None or len(calls) != 1:
            return self._to_text()
        self._calls(calls, out, self._buf[:end])
        self._tag = ""
        self._buf = self._buf[end:]
        self._state = "separator"
        return True

    def _step_separator(self, out: Collected) -> bool:
        head = self._buf.lstrip()
        if not head:
            return False
        if head[0] == ";":
            self._buf = head[1:]
            self._scanner = JsonValueScanner()
            self._state = "calls"
        else:
            self._state = "text"
        return True

    def _payload(self) -> str | None:
        return self._buf if self._state == "calls" else None

    def _to_text(self) -> bool:
        """Not a call after all: everything from here on is plain text."""
        self._tracker.abandon()
        self._buf = self._tag + self._buf
        self._state = "text"
        return True

    def _finish(self, out: Collected) -> None:
        self._content(self._tag + self._buf, out)


# Markers in a chat template that tell which tool-call format the model was trained on.
_TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3_json"),
)


def tool_parser_for_template(template: str | None) -> str | None:
    """The tool-call parser a chat template calls for, when it is recognisable; else None."""
    for marker, name in _TEMPLATE_MARKERS:
        if template and marker in template:
            return name
    return None
