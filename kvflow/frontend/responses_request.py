"""Responses request → the chat pipeline's ChatCompletionRequest, and the previous-response store.

`previous_response_id` continues a conversation: the store keeps, per response id, the
conversation it ended (input items and output, as chat messages; never its
`instructions`, which OpenAI does not carry over either). Limits of the store: it lives
in one frontend process's memory (a client must send follow-ups to the same frontend,
and a restart forgets everything); it holds at most `FrontendConfig.responses_store_size`
responses and drops the least recently used one beyond that; an unknown or dropped id
is a 404. `store: false` keeps a response out of it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NoReturn

from kvflow.frontend.errors import ApiError, bad_request
from kvflow.llm import responses as rs
from kvflow.llm.openai import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDef,
    JsonSchemaFormat,
    NamedFunction,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoiceFunction,
)

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


class ResponseStore:
    """Conversations of recent responses by id, least recently used dropped beyond `size`."""

    def __init__(self, size: int) -> None:
        assert size >= 0
        self.size = size
        self._items: OrderedDict[str, list[ChatMessage]] = OrderedDict()

    def get(self, response_id: str) -> list[ChatMessage]:
        messages = self._items.get(response_id)
        if messages is None:
            raise ApiError(
                404, f"Previous response with id '{response_id}' not found; this server keeps "
                f"the last {self.size} stored responses in memory, per frontend.",
                param="previous_response_id", code="previous_response_not_found")
        self._items.move_to_end(response_id)
        return messages

    def put(self, response_id: str, messages: list[ChatMessage]) -> None:
        if self.size == 0:
            return
        self._items[response_id] = messages
        self._items.move_to_end(response_id)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def conversation(req: rs.ResponsesRequest, store: ResponseStore) -> list[ChatMessage]:
    """The conversation so far (previous response's, then this request's input), no system."""
    earlier = list(store.get(req.previous_response_id)) if req.previous_response_id else []
    if isinstance(req.input, str):
        return [*earlier, ChatMessage("user", req.input)]
    return earlier + input_messages(req.input)


def to_chat(req: rs.ResponsesRequest, messages: list[ChatMessage]) -> ChatCompletionRequest:
    system = [ChatMessage("system", req.instructions)] if req.instructions else []
    return ChatCompletionRequest(
        model=req.model, messages=system + messages, stream=req.stream,
        max_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
        tools=_tools(req.tools), tool_choice=_tool_choice(req) if req.tools else None,
        response_format=_format(req.text), user=req.user,
    )


def input_messages(items: list[rs.InputItem]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    reasoning: list[str] = []
    for i, item in enumerate(items):
        if item.type == "reasoning":
            reasoning.append(_text(i, item.content))
        elif item.type == "function_call":
            _add_call(out, i, item, reasoning)
        elif item.type == "function_call_output":
            if item.call_id is None:
                _missing(i, "call_id")
            out.append(ChatMessage("tool", item.output or "", tool_call_id=item.call_id))
        else:
            if item.role is None:
                _missing(i, "role")
            msg = ChatMessage(item.role, _text(i, item.content))
            if item.role == "assistant" and reasoning:
                msg.reasoning_content, reasoning = "".join(reasoning), []
            out.append(msg)
    return out


def _add_call(out: list[ChatMessage], i: int, item: rs.InputItem, reasoning: list[str]) -> None:
    if item.call_id is None or item.name is None:
        _missing(i, "call_id" if item.call_id is None else "name")
    call = ToolCall(FunctionCall(item.name, item.arguments or "{}"), item.call_id)
    last = out[-1] if out else None
    if last is None or last.role != "assistant":
        last = ChatMessage("assistant", "")
        out.append(last)
    last.tool_calls = [*(last.tool_calls or ()), call]
    if reasoning:
        last.reasoning_content = "".join(reasoning)
        reasoning.clear()


def _text(i: int, content: str | list[rs.InputPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type not in _TEXT_PARTS and part.type not in ("reasoning_text", "summary_text"):
            raise bad_request(
                f"input[{i}].content[{j}]: content of type '{part.type}' is not supported by "
                "this server; send input_text parts.", param=f"input[{i}].content[{j}].type")
        texts.append(part.text or "")
    return "".join(texts)


def _missing(i: int, field: str) -> NoReturn:
    raise bad_request(f"Missing required parameter 'input[{i}].{field}'.", f"input[{i}].{field}")


def _tools(tools: list[rs.FunctionTool] | None) -> list[Tool] | None:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if t.type != "function":
            raise bad_request(f"tools[{i}]: tools of type '{t.type}' are not supported by this "
                              "server; send function tools.", param=f"tools[{i}].type")
        if not t.name:
            raise bad_request(f"Missing required parameter 'tools[{i}].name'.", f"tools[{i}].name")
        out.append(Tool(FunctionDef(t.name, t.description, t.parameters, t.strict)))
    return out


def _tool_choice(req: rs.ResponsesRequest) -> str | ToolChoiceFunction | None:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return ToolChoiceFunction(NamedFunction(choice.name))


def _format(text: rs.TextConfig | None) -> ResponseFormat | None:
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat("json_object")
    return ResponseFormat("json_schema",
                          JsonSchemaFormat(fmt.name, fmt.schema, fmt.description, fmt.strict))
