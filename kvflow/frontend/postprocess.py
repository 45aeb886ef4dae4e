"""ChoiceProcessor: one choice's engine outputs → text, reasoning and tool-call deltas.

Per output: detokenize incrementally, cut at stop strings (held back across token
boundaries, never leaked), split reasoning from content, pull tool calls out of the
content. On a stop-string match the choice is finished at once and the caller stops
its engine request. The plain-text path (no stop strings, no parsers, no logprobs)
is one detokenizer call and one small object per output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from kvflow.frontend.models import ServedModel
from kvflow.frontend.preprocess import OutputOptions
from kvflow.llm.detokenizer import IncrementalDetokenizer
from kvflow.llm.parsers.tool_calls import ToolCall
from kvflow.llm.parsers.tool_stream import ToolCallPiece
from kvflow.llm.protocol import FINISH_LENGTH, FINISH_STOP, EngineOutput, TopLogprob
from kvflow.llm.stop import StopStringMatcher

FINISH_TOOL_CALLS = "tool_calls"
_GOOD_FINISH = frozenset((FINISH_STOP, FINISH_LENGTH))


class EngineError(Exception):
    """The engine reported an error (or ended a request on its own) mid-generation."""


class TokenLogprobs(msgspec.Struct):
    """The logprobs of the tokens behind one delta, as the engine sent them."""

    token_ids: list[int]
    logprobs: list[float]
    top: list[list[TopLogprob]] | None


class ChoiceDelta(msgspec.Struct):
    """What one engine output adds to choice `index` of the response.

    A msgspec Struct rather than a dataclass: one is built per streamed token, and a
    Struct's constructor is C code (about 3x cheaper).
    """

    index: int
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] | None = None
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None
    # Position of tool_calls[0] among all the choice's tool calls (stream deltas number them).
    tool_call_base: int = 0
    # Tool calls as they are written: what streamed responses send (tool_calls: when whole).
    tool_pieces: list[ToolCallPiece] | None = None


@dataclass(slots=True)
class _Split:
    text: str
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    pieces: list[ToolCallPiece] = field(default_factory=list)


class ChoiceProcessor:
    """Stateful postprocessor of one choice. `process` per output; `finish` if none ended it."""

    def __init__(
        self, model: ServedModel, options: OutputOptions, index: int, prompt_ids: list[int]
    ) -> None:
        self.index = index
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cached_tokens: int | None = None
        self.cached_by_tier: dict[str, int] | None = None  # kvflow extension: per KV tier
        self.tool_call_count = 0
        # True when a stop string ended the choice: the caller must stop the engine.
        self.stopped_by_string = False
        # The stop string that ended the choice (APIs that report it: Anthropic Messages).
        self.stop_sequence: str | None = None
        self._detok = IncrementalDetokenizer(
            model.tokenizer, prompt_ids, skip_special_tokens=options.skip_special_tokens
        )
        self._stopper = (
            StopStringMatcher(options.stop, options.include_stop_str) if options.stop else None
        )
        self._reasoning = (
            model.reasoning_parser(in_reasoning=options.reasoning_open)
            if options.reasoning and model.reasoning_parser is not None else None
        )
        self._tools = model.tool_parser() if options.tools and model.tool_parser else None
        self._want_logprobs = options.logprobs is not None
        self._plain = self._stopper is None and self._reasoning is None and self._tools is None

    def process(self, out: EngineOutput) -> ChoiceDelta | None:
        """The delta of one engine output, or None when it adds nothing."""
        if self.finish_reason is not None:
            return None
        finish = out.finish_reason
        if (finish is not None and finish not in _GOOD_FINISH) or out.error is not None:
            raise EngineError(_engine_failure(out))
        if out.cached_tokens is not None:
            self.cached_tokens = out.cached_tokens
            self.cached_by_tier = out.cached_tokens_by_tier
        ids = out.token_ids
        text = ""
        if ids:
            self.completion_tokens += len(ids)
            text = self._detok.push(ids)
        logprobs = self._logprobs(out) if self._want_logprobs and ids else None
        if self._plain and finish is None:
            if text or logprobs is not None:
                return ChoiceDelta(self.index, text, "", None, logprobs)
            return None
        return self._rich(text, finish, logprobs)

    def finish(self) -> ChoiceDelta | None:
        """End a choice whose engine stream stopped without a finish reason."""
        if self.finish_reason is not None:
            return None
        return self._rich("", FINISH_STOP, None)

    def _rich(self, text: str, finish: str | None, logprobs: TokenLogprobs | None) -> ChoiceDelta:
        if self._stopper is not None and text:
            text = self._stop_filter(text)
        if finish is not None and self.finish_reason is None:
            self.finish_reason = finish
        ended = self.finish_reason is not None
        if ended:
            text += self._flush_text()
        split = self._parse(text, ended)
        base = self.tool_call_count
        self.tool_call_count += len(split.calls)
        if ended and self.tool_call_count and self.finish_reason == FINISH_STOP:
            self.finish_reason = FINISH_TOOL_CALLS
        return ChoiceDelta(
            self.index, split.text, split.reasoning, split.calls or None, logprobs,
            self.finish_reason if ended else None, base, split.pieces or None,
        )

    def _stop_filter(self, text: str) -> str:
        assert self._stopper is not None
        result = self._stopper.push(text)
        if result.stopped and self.finish_reason is None:
            self.finish_reason = FINISH_STOP
            self.stopped_by_string = True
            self.stop_sequence = result.matched
        return result.text

    def _flush_text(self) -> str:
        """Text still held by the detokenizer and stop matcher, once the choice has ended."""
        if self.stopped_by_string:
            return ""
        # An output cut inside a multi-byte character (max_tokens) ends before that character
        # rather than in U+FFFD replacement characters.
        tail = self._detok.flush().rstrip("\ufffd")
        if self._stopper is None:
            return tail
        tail = self._stop_filter(tail) if tail else ""
        return tail + self._stopper.flush()

    def _parse(self, text: str, ended: bool) -> _Split:
        reasoning = ""
        if self._reasoning is not None:
            part = self._reasoning.push(text) if text else None
            text, reasoning = (part.content, part.reasoning) if part else ("", "")
            if ended:
                tail = self._reasoning.flush()
                text, reasoning = text + tail.content, reasoning + tail.reasoning
        if self._tools is None:
            return _Split(text, reasoning)
        calls: list[ToolCall] = []
        pieces: list[ToolCallPiece] = []
        if text:
            found = self._tools.push(text)
            text, calls, pieces = found.content, list(found.calls), list(found.pieces)
        if ended:
            tail = self._tools.flush()
            text, calls = text + tail.content, calls + list(tail.calls)
            pieces += tail.pieces
        return _Split(text, reasoning, calls, pieces)

    def _logprobs(self, out: EngineOutput) -> TokenLogprobs | None:
        if out.logprobs is None:
            return None
        return TokenLogprobs(list(out.token_ids), out.logprobs, out.top_logprobs)


def _engine_failure(out: EngineOutput) -> str:
    if out.error:
        return out.error
    if out.finish_reason == "cancelled":
        return "the worker cancelled the request before it finished (is it shutting down?); retry"
    return f"the engine ended the request with finish reason {out.finish_reason!r}"
