"""Anthropic Messages request → the chat pipeline's ChatCompletionRequest (one translation).

System prompt, content blocks (text, thinking, tool_use, tool_result), tools and
tool_choice map onto their chat-completions counterparts, so the rest of the pipeline
(template, routing, limits, parsers) is the chat one unchanged.

Stable prefix (`FrontendConfig.anthropic_stable_prefix`): agents resend a system prompt
whose tail changes per request (a date, a working directory, a session id), which puts
a different token at the very start of every prompt and defeats prefix caching. With the
option on, the system blocks after the last `cache_control` breakpoint (or, when no block
carries one, every block after the first) move out of the system prompt to the end of
the last user turn, inside `<system-reminder>` tags. The conversation before that turn
then renders to the same tokens on every request, and its KV blocks are reused.
Trade-off: the model reads those instructions at the end of the conversation, in a user
turn, not at the top; a model that relies on them being system text may follow them
less closely. A plain-string system prompt has no block structure and is left as it is.
"""

from __future__ import annotations

import json
from typing import NoReturn

from kvflow.frontend.errors import bad_request
from kvflow.llm import anthropic as an
from kvflow.llm.openai import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDef,
    NamedFunction,
    Tool,
    ToolCall,
    ToolChoiceFunction,
)

REMINDER = "<system-reminder>\n{text}\n</system-reminder>"


def to_chat(req: an.MessagesRequest | an.CountTokensRequest, stable_prefix: bool
            ) -> ChatCompletionRequest:
    """The chat request `req` means; 400 (ApiError) for what this server cannot serve."""
    system, volatile = split_system(req.system, stable_prefix)
    messages = [ChatMessage("system", system)] if system else []
    for i, msg in enumerate(req.messages):
        messages.extend(_messages(i, msg))
    if volatile:
        _append_reminder(messages, volatile)
    extra: dict = {}
    if isinstance(req, an.MessagesRequest):
        extra = dict(
            max_tokens=req.max_tokens, stop=req.stop_sequences, stream=req.stream,
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or None,
        )
    return ChatCompletionRequest(
        model=req.model, messages=messages, tools=_tools(req.tools),
        tool_choice=_tool_choice(req.tool_choice) if req.tools else None, **extra,
    )


def split_system(system: str | list[an.TextBlock] | None, stable_prefix: bool
                 ) -> tuple[str, str]:
    """(system prompt, volatile text moved to the last user turn)."""
    if system is None or isinstance(system, str):
        return system or "", ""
    texts = [b.text for b in system]
    if not stable_prefix or len(system) < 2:
        return "\n".join(texts), ""
    marked = [i for i, b in enumerate(system) if b.cache_control is not None]
    cut = marked[-1] + 1 if marked else 1
    return "\n".join(texts[:cut]), "\n".join(texts[cut:])


def _append_reminder(messages: list[ChatMessage], text: str) -> None:
    reminder = REMINDER.format(text=text)
    for msg in reversed(messages):
        if msg.role == "user":
            assert isinstance(msg.content, str)
            msg.content = f"{msg.content}\n\n{reminder}" if msg.content else reminder
            return
    messages.append(ChatMessage("user", reminder))


def _messages(i: int, msg: an.InputMessage) -> list[ChatMessage]:
    if isinstance(msg.content, str):
        return [ChatMessage(msg.role, msg.content)]
    if msg.role == "assistant":
        return [_assistant(i, msg.content)]
    return _user(i, msg.content)


def _assistant(i: int, blocks: list[an.RequestBlock]) -> ChatMessage:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[ToolCall] = []
    for j, block in enumerate(blocks):
        if isinstance(block, an.TextBlock):
            texts.append(block.text)
        elif isinstance(block, an.ThinkingBlock):
            thinking.append(block.thinking)
        elif isinstance(block, an.ToolUseBlock):
            calls.append(ToolCall(FunctionCall(block.name, json.dumps(block.input)), block.id))
        else:
            _unsupported(i, j, block, "assistant")
    return ChatMessage("assistant", "".join(texts), tool_calls=calls or None,
                       reasoning_content="".join(thinking) or None)


def _user(i: int, blocks: list[an.RequestBlock]) -> list[ChatMessage]:
    """Tool results become `tool` messages (first, in order); text parts one user message."""
    out: list[ChatMessage] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        if isinstance(block, an.TextBlock):
            texts.append(block.text)
        elif isinstance(block, an.ToolResultBlock):
            out.append(ChatMessage("tool", _result_text(block), tool_call_id=block.tool_use_id))
        else:
            _unsupported(i, j, block, "user")
    if texts or not out:
        out.append(ChatMessage("user", "\n".join(texts)))
    return out


def _result_text(block: an.ToolResultBlock) -> str:
    content = block.content
    text = content if isinstance(content, str) else "\n".join(b.text for b in content or ())
    return f"Error: {text}" if block.is_error else text


def _unsupported(i: int, j: int, block: an.RequestBlock, role: str) -> NoReturn:
    kind = type(block).__struct_config__.tag
    raise bad_request(
        f"messages[{i}].content[{j}]: a {kind!r} block is not supported in a {role} message "
        "by this server; send text, tool_use (assistant) or tool_result (user) blocks.",
        param=f"messages[{i}].content[{j}].type",
    )


def _tools(tools: list[an.ToolDef] | None) -> list[Tool] | None:
    if not tools:
        return None
    return [Tool(FunctionDef(t.name, t.description, t.input_schema or None)) for t in tools]


def _tool_choice(choice: an.ToolChoice | None) -> str | ToolChoiceFunction | None:
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "any":
        return "required"
    if choice.type == "none":
        return "none"
    if not choice.name:
        raise bad_request("tool_choice of type 'tool' needs a name.", param="tool_choice.name")
    return ToolChoiceFunction(NamedFunction(choice.name))
