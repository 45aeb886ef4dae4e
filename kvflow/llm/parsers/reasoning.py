"""Reasoning parsers: split `<think>…</think>` reasoning from the answer, whole or streaming.

Whitespace policy (the same streaming or not): reasoning loses its leading and trailing
whitespace, and the answer loses the whitespace right after `</think>`. When the chat
template already opened `<think>` in the prompt, build the parser with `in_reasoning=True`
(`prompt_opens_reasoning(prompt)` tells) and the output starts inside the reasoning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from kvflow.llm.parsers._stream import partial_suffix
from kvflow.llm.parsers.registry import Registry


@dataclass(frozen=True)
class ReasoningResult:
    """A whole message split: `reasoning` is None when the output had none."""

    reasoning: str | None
    content: str


class ReasoningDelta(NamedTuple):
    """What one streamed delta adds to each part (either may be "")."""

    reasoning: str = ""
    content: str = ""


_REGISTRY: Registry[ReasoningParser] = Registry("reasoning parser")


def register_reasoning_parser(
    name: str, *aliases: str
) -> Callable[[type[ReasoningParser]], type[ReasoningParser]]:
    """Class decorator registering a reasoning parser under `name` (and aliases)."""
    return _REGISTRY.register(name, *aliases)


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The reasoning parser class registered as `name`; ValueError listing the known names."""
    return _REGISTRY.get(name)


def reasoning_parser_names() -> list[str]:
    return _REGISTRY.names()


class ReasoningParser:
    """Base: a start and end marker; the stream alternates between answer and reasoning."""

    start_marker = "<think>"
    end_marker = "</think>"

    def __init__(self, *, in_reasoning: bool = False) -> None:
        self.initially_in_reasoning = in_reasoning
        self._in_reasoning = in_reasoning
        self._saw_reasoning = in_reasoning
        self._buf = ""  # a possible partial marker
        self._held_ws = ""  # trailing whitespace of reasoning, dropped if the block ends
        self._strip_next = in_reasoning  # drop leading whitespace of the next piece

    @classmethod
    def prompt_opens_reasoning(cls, prompt: str) -> bool:
        """True when the prompt ends inside an unclosed reasoning block."""
        start = prompt.rfind(cls.start_marker)
        return start >= 0 and prompt.find(cls.end_marker, start) < 0

    def parse(self, text: str) -> ReasoningResult:
        """Split a whole output (does not touch this parser's streaming state)."""
        fresh = type(self)(in_reasoning=self.initially_in_reasoning)
        first, last = fresh.push(text), fresh.flush()
        reasoning = first.reasoning + last.reasoning
        has_reasoning = fresh._saw_reasoning and bool(reasoning)
        return ReasoningResult(reasoning if has_reasoning else None, first.content + last.content)

    def push(self, delta: str) -> ReasoningDelta:
        """Split one delta; text that may be the start of a marker waits for the next one."""
        buf = self._buf + delta
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            marker = self.end_marker if self._in_reasoning else self.start_marker
            at = buf.find(marker)
            if at < 0:
                cut = len(buf) - partial_suffix(buf, marker)
                self._emit(buf[:cut], reasoning, content, block_ends=False)
                self._buf = buf[cut:]
                return ReasoningDelta("".join(reasoning), "".join(content))
            self._emit(buf[:at], reasoning, content, block_ends=True)
            buf = buf[at + len(marker) :]
            self._toggle()

    def flush(self) -> ReasoningDelta:
        """End of stream: release a held partial marker; an open block's trailing space goes."""
        reasoning: list[str] = []
        content: list[str] = []
        self._emit(self._buf, reasoning, content, block_ends=True)
        self._buf = ""
        return ReasoningDelta("".join(reasoning), "".join(content))

    def _toggle(self) -> None:
        self._in_reasoning = not self._in_reasoning
        self._saw_reasoning = True
        self._strip_next = True
        self._held_ws = ""

    def _emit(self, piece: str, reasoning: list[str], content: list[str], block_ends: bool) -> None:
        if self._strip_next:
            piece = piece.lstrip()
            self._strip_next = not piece
        if not self._in_reasoning:
            content.append(piece)
            return
        piece = self._held_ws + piece
        body = piece.rstrip()
        self._held_ws = "" if block_ends else piece[len(body) :]
        reasoning.append(body)


@register_reasoning_parser("think", "deepseek_r1", "qwen3")
class ThinkReasoningParser(ReasoningParser):
    """`<think>reasoning</think>answer`, as DeepSeek-R1 and Qwen3 write it."""
