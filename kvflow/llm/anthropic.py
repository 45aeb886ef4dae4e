"""Anthropic Messages API types: the /v1/messages request, response, stream events, errors.

Requests decode straight from the HTTP body (unknown fields ignored, as Anthropic's own
SDK sends some this server does not use); content blocks are a tagged union on `type`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class CacheControl(msgspec.Struct):
    type: str = "ephemeral"


class TextBlock(msgspec.Struct, tag="text", omit_defaults=True):
    text: str
    cache_control: CacheControl | None = None


class ImageBlock(msgspec.Struct, tag="image"):
    """Accepted by the decoder so the error can say images are not served."""

    source: dict[str, Any] | None = None


class ToolUseBlock(msgspec.Struct, tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any] = {}


class ToolResultBlock(msgspec.Struct, tag="tool_result", omit_defaults=True):
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False


class ThinkingBlock(msgspec.Struct, tag="thinking", omit_defaults=True):
    thinking: str
    signature: str = ""


RequestBlock = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock


class InputMessage(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[RequestBlock]


class ToolDef(msgspec.Struct, omit_defaults=True):
    name: str
    input_schema: dict[str, Any] = {}
    description: str | None = None
    cache_control: CacheControl | None = None


class ToolChoice(msgspec.Struct, omit_defaults=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _MessageFields(msgspec.Struct, kw_only=True):
    """What a message request and a count_tokens request share."""

    model: str
    messages: Annotated[list[InputMessage], msgspec.Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(_MessageFields, kw_only=True):
    """Body of POST /v1/messages."""

    max_tokens: PositiveInt
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    metadata: dict[str, Any] | None = None


class CountTokensRequest(_MessageFields, kw_only=True):
    """Body of POST /v1/messages/count_tokens."""


class CountTokensResponse(msgspec.Struct):
    input_tokens: int


# ---------------------------------------------------------------- responses


class MessageUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class OutText(msgspec.Struct, tag="text"):
    text: str


class OutThinking(msgspec.Struct, tag="thinking"):
    thinking: str
    signature: str = ""


class OutToolUse(msgspec.Struct, tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


OutBlock = OutText | OutThinking | OutToolUse
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageResponse(msgspec.Struct, tag="message"):
    id: str
    model: str
    content: list[OutBlock]
    stop_reason: StopReason | None
    usage: MessageUsage
    stop_sequence: str | None = None
    role: str = "assistant"


# ---------------------------------------------------------------- stream events


class TextDelta(msgspec.Struct, tag="text_delta"):
    text: str


class ThinkingDelta(msgspec.Struct, tag="thinking_delta"):
    thinking: str


class InputJsonDelta(msgspec.Struct, tag="input_json_delta"):
    partial_json: str


class MessageStart(msgspec.Struct, tag="message_start"):
    message: MessageResponse


class BlockStart(msgspec.Struct, tag="content_block_start"):
    index: int
    content_block: OutBlock


class BlockDelta(msgspec.Struct, tag="content_block_delta"):
    index: int
    delta: TextDelta | ThinkingDelta | InputJsonDelta


class BlockStop(msgspec.Struct, tag="content_block_stop"):
    index: int


class MessageDeltaBody(msgspec.Struct):
    stop_reason: StopReason | None
    stop_sequence: str | None = None


class OutputUsage(msgspec.Struct):
    output_tokens: int


class MessageDelta(msgspec.Struct, tag="message_delta"):
    delta: MessageDeltaBody
    usage: OutputUsage


class MessageStop(msgspec.Struct, tag="message_stop"):
    pass


class ErrorDetail(msgspec.Struct):
    type: str
    message: str


class ErrorEvent(msgspec.Struct, tag="error"):
    error: ErrorDetail


StreamEvent = MessageStart | BlockStart | BlockDelta | BlockStop | MessageDelta | MessageStop
