"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API on the chat pipeline.

A request is translated once (`anthropic_request.to_chat`) and runs through the chat
pipeline (`chat.run_chat`: limits, admission, template, routing, migration, metrics);
this module only writes the result in Anthropic's shapes: content blocks, the stream's
events in Anthropic's order, and `{"type": "error", ...}` errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec

from kvflow.frontend import limits
from kvflow.frontend import preprocess as pre
from kvflow.frontend.anthropic_request import to_chat
from kvflow.frontend.chat import ChatRun, run_chat
from kvflow.frontend.errors import ApiError, model_not_found
from kvflow.frontend.generation import Generation, stream_sse
from kvflow.frontend.handlers import FrontendState, Handler, decode_body, in_own_task
from kvflow.frontend.http_response import HttpRequest, Responder
from kvflow.frontend.postprocess import FINISH_TOOL_CALLS, ChoiceDelta, ChoiceProcessor
from kvflow.llm import anthropic as an
from kvflow.llm.protocol import FINISH_LENGTH

_DECODER = msgspec.json.Decoder(an.MessagesRequest)
_COUNT_DECODER = msgspec.json.Decoder(an.CountTokensRequest)
_ENCODER = msgspec.json.Encoder()
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


class AnthropicError(ApiError):
    """An ApiError written in Anthropic's shape: `{"type": "error", "error": {type, message}}`."""

    @classmethod
    def of(cls, exc: ApiError) -> AnthropicError:
        return cls(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code,
                   retry_after_s=exc.retry_after_s)

    @property
    def anthropic_type(self) -> str:
        return _ERROR_TYPES.get(self.status, "api_error")

    def body(self) -> bytes:
        return _ENCODER.encode(an.ErrorEvent(an.ErrorDetail(self.anthropic_type, self.message)))


def anthropic_errors(handler: Handler) -> Handler:
    """`handler` with every ApiError it raises re-shaped as an AnthropicError."""

    async def wrapped(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
        try:
            await handler(state, request, responder)
        except AnthropicError:
            raise
        except ApiError as exc:
            raise AnthropicError.of(exc) from exc

    return wrapped


async def _messages(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    body: an.MessagesRequest = decode_body(_DECODER, request.body)
    chat = to_chat(body, state.config.anthropic_stable_prefix)

    async def respond(gen: Generation, prepared: pre.Prepared) -> None:
        if body.stream:
            await in_own_task(_stream(gen, responder))
        else:
            await _collect(gen, responder)

    await run_chat(state, request, responder, chat, ChatRun("messages", "msg_"), respond)


async def _count_tokens(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    body: an.CountTokensRequest = decode_body(_COUNT_DECODER, request.body)
    chat = to_chat(body, state.config.anthropic_stable_prefix)
    pre.validate_chat(chat)
    model = state.models.get(chat.model)
    if model is None:
        raise model_not_found(chat.model, state.models.names())
    limits.check_chat(state.config, model, chat)
    prompt = await pre.run_maybe_offloaded(
        state.executor, pre.chat_prompt_chars(chat), state.config.offload_prompt_chars,
        lambda: pre.tokenize_chat(model, chat),
    )
    responder.send(200, _ENCODER.encode(an.CountTokensResponse(len(prompt.ids))))


handle_messages = anthropic_errors(_messages)
handle_count_tokens = anthropic_errors(_count_tokens)


# ---------------------------------------------------------------- blocks


class BlockEvents:
    """Choice deltas → content-block events: a block opens on its first piece, a new kind
    of piece closes it; a tool call is a whole tool_use block (start, its input, stop)."""

    def __init__(self) -> None:
        self.index = -1
        self._open: type | None = None

    def delta(self, d: ChoiceDelta) -> list[an.StreamEvent]:
        events: list[an.StreamEvent] = []
        if d.reasoning:
            self._ensure(an.OutThinking, events)
            events.append(an.BlockDelta(self.index, an.ThinkingDelta(d.reasoning)))
        if d.text:
            self._ensure(an.OutText, events)
            events.append(an.BlockDelta(self.index, an.TextDelta(d.text)))
        for piece in d.tool_pieces or ():  # a call's input streams as the model writes it
            if piece.id is not None:
                block = an.OutToolUse(piece.id, piece.name or "", {})
                self._ensure(an.OutToolUse, events, block=block)
            if piece.arguments:
                events.append(an.BlockDelta(self.index, an.InputJsonDelta(piece.arguments)))
        if d.tool_calls and self._open is an.OutToolUse:
            self.close(events)  # the last call written is complete
        return events

    def close(self, events: list[an.StreamEvent]) -> None:
        if self._open is not None:
            events.append(an.BlockStop(self.index))
            self._open = None

    def _ensure(self, kind: type, events: list[an.StreamEvent], block: Any = None) -> None:
        if self._open is kind and kind is not an.OutToolUse:
            return
        self.close(events)
        self.index += 1
        self._open = kind
        start = block or (an.OutText("") if kind is an.OutText else an.OutThinking(""))
        events.append(an.BlockStart(self.index, start))


class Blocks:
    """Folds block events into the finished content list (the non-streamed response)."""

    def __init__(self) -> None:
        self.blocks: list[an.OutBlock] = []
        self._json: dict[int, list[str]] = {}

    def apply(self, event: an.StreamEvent) -> None:
        if isinstance(event, an.BlockStart):
            self.blocks.append(event.content_block)
        elif isinstance(event, an.BlockDelta):
            block, piece = self.blocks[event.index], event.delta
            if isinstance(piece, an.TextDelta) and isinstance(block, an.OutText):
                block.text += piece.text
            elif isinstance(piece, an.ThinkingDelta) and isinstance(block, an.OutThinking):
                block.thinking += piece.thinking
            elif isinstance(piece, an.InputJsonDelta):
                self._json.setdefault(event.index, []).append(piece.partial_json)
        elif isinstance(event, an.BlockStop) and event.index in self._json:
            block = self.blocks[event.index]
            assert isinstance(block, an.OutToolUse)
            block.input = tool_input("".join(self._json.pop(event.index)))


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's JSON arguments as Anthropic's `input` object."""
    value = json.loads(arguments) if arguments.strip() else {}
    return value if isinstance(value, dict) else {"arguments": value}


def stop_reason(proc: ChoiceProcessor) -> an.StopReason:
    if proc.finish_reason == FINISH_TOOL_CALLS:
        return "tool_use"
    if proc.finish_reason == FINISH_LENGTH:
        return "max_tokens"
    return "stop_sequence" if proc.stop_sequence is not None else "end_turn"


def _usage(gen: Generation) -> an.MessageUsage:
    usage = gen.usage()
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return an.MessageUsage(usage.prompt_tokens - cached, usage.completion_tokens, cached)


def _message(gen: Generation, content: list[an.OutBlock], done: bool) -> an.MessageResponse:
    proc = gen.processors[0]
    reason = stop_reason(proc) if done else None
    return an.MessageResponse(gen.ids.id, gen.ids.model, content, reason, _usage(gen),
                              proc.stop_sequence if done else None)


async def _collect(gen: Generation, responder: Responder) -> None:
    events, blocks = BlockEvents(), Blocks()
    async for d in gen.deltas():
        for event in events.delta(d):
            blocks.apply(event)
    responder.send(200, _ENCODER.encode(_message(gen, blocks.blocks, done=True)))


# ---------------------------------------------------------------- streaming


def sse(event: an.StreamEvent | an.ErrorEvent) -> bytes:
    name = type(event).__struct_config__.tag
    return b"event: " + str(name).encode() + b"\ndata: " + _ENCODER.encode(event) + b"\n\n"


def _encoder(gen: Generation, blocks: BlockEvents) -> Callable[[ChoiceDelta], bytes]:
    def encode(d: ChoiceDelta) -> bytes:
        events = blocks.delta(d)
        if d.finish_reason is not None:
            blocks.close(events)
        return b"".join(sse(e) for e in events)

    return encode


async def _stream(gen: Generation, responder: Responder) -> None:
    blocks = BlockEvents()

    def opening() -> bytes:
        return sse(an.MessageStart(_message(gen, [], done=False)))

    def closing() -> bytes:
        proc = gen.processors[0]
        delta = an.MessageDeltaBody(stop_reason(proc), proc.stop_sequence)
        usage = an.OutputUsage(proc.completion_tokens)
        return sse(an.MessageDelta(delta, usage)) + sse(an.MessageStop())

    def error_event(exc: ApiError) -> bytes:
        err = AnthropicError.of(exc)
        return sse(an.ErrorEvent(an.ErrorDetail(err.anthropic_type, err.message)))

    await stream_sse(gen, responder, _encoder(gen, blocks), opening, closing,
                     done=b"", error_event=error_event)
