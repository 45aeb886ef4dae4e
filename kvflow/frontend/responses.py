"""POST /v1/responses: the OpenAI Responses API on the chat pipeline.

The request becomes a chat request (`responses_request.to_chat`, after the conversation
of `previous_response_id` is put in front) and runs through `chat.run_chat`; this module
turns the choice deltas into output items (reasoning, message, function_call) and, when
streaming, into the Responses event sequence: response.created, response.in_progress,
then per item output_item.added → its deltas → its done events → output_item.done, and
response.completed (or response.incomplete when max_output_tokens cut it short).
"""

from __future__ import annotations

import msgspec

from kvflow.frontend import preprocess as pre
from kvflow.frontend import responses_request as rq
from kvflow.frontend.chat import ChatRun, run_chat
from kvflow.frontend.errors import ApiError
from kvflow.frontend.generation import Generation, stream_sse
from kvflow.frontend.handlers import FrontendState, decode_body, in_own_task, new_id
from kvflow.frontend.http_response import HttpRequest, Responder
from kvflow.frontend.postprocess import ChoiceDelta
from kvflow.llm import responses as rs
from kvflow.llm.openai import ChatMessage, FunctionCall, ToolCall
from kvflow.llm.protocol import FINISH_LENGTH

_DECODER = msgspec.json.Decoder(rs.ResponsesRequest)
_ENCODER = msgspec.json.Encoder()


async def handle_responses(state: FrontendState, request: HttpRequest, responder: Responder
                           ) -> None:
    body: rs.ResponsesRequest = decode_body(_DECODER, request.body)
    messages = rq.conversation(body, state.responses)
    chat = rq.to_chat(body, messages)

    async def respond(gen: Generation, prepared: pre.Prepared) -> None:
        items = OutputItems()
        if body.stream:
            await in_own_task(_stream(gen, responder, body, items))
        else:
            async for d in gen.deltas():
                items.delta(d)
            responder.send(200, _ENCODER.encode(response(gen, body, items, final=True)))
        if body.store and items.finished:
            state.responses.put(gen.ids.id, [*messages, items.as_message()])

    await run_chat(state, request, responder, chat, ChatRun("responses", "resp_"), respond)


class OutputItems:
    """Choice deltas → output items, with the stream events that build them. A reasoning or
    message item opens on its first piece and closes when another kind of piece comes; a
    function_call item opens on its call's first piece, streams its arguments, and is done
    when the call completes. `items` holds the finished ones, in order."""

    def __init__(self) -> None:
        self.items: list[rs.OutputItem] = []
        self.finished = False
        self._count = 0  # output indices handed out
        self._open: str | None = None
        self._id = ""
        self._index = 0
        self._text: list[str] = []
        self._calls: dict[str, tuple[rs.FunctionCallItem, int]] = {}  # by call id
        self._by_piece: dict[int, str] = {}  # piece index → call id

    def delta(self, d: ChoiceDelta) -> list[rs.StreamEvent]:
        events: list[rs.StreamEvent] = []
        if d.reasoning:
            self._piece("reasoning", "response.reasoning_text.delta", d.reasoning, events)
        if d.text:
            self._piece("message", "response.output_text.delta", d.text, events)
        for piece in d.tool_pieces or ():
            if piece.id is not None:
                self._start_call(piece.id, piece.name or "", events)
                self._by_piece[piece.index] = piece.id
            if piece.arguments:
                item, index = self._calls[self._by_piece[piece.index]]
                events.append(_event("response.function_call_arguments.delta", index,
                                     item_id=item.id, delta=piece.arguments))
        for call in d.tool_calls or ():
            self._end_call(call.id, call.name, call.arguments, events)
        if d.finish_reason is not None:
            self.close(events)
            self.finished = True
        return events

    def close(self, events: list[rs.StreamEvent]) -> None:
        if self._open is None:
            return
        text, where = "".join(self._text), self._where()
        if self._open == "message":
            part = rs.OutputText(text)
            events.append(_event("response.output_text.done", text=text, logprobs=[], **where))
            events.append(_event("response.content_part.done", part=part, **where))
            item: rs.OutputItem = rs.MessageItem(self._id, [part])
        else:
            events.append(_event("response.reasoning_text.done", text=text, **where))
            item = rs.ReasoningItem(self._id, [rs.ReasoningText(text)])
        self._open = None
        self._finish(item, self._index, events)

    def as_message(self) -> ChatMessage:
        """The output as one assistant message, for the next turn of the conversation."""
        msg = ChatMessage("assistant", "")
        for item in self.items:
            if isinstance(item, rs.MessageItem):
                msg.content = (msg.content or "") + "".join(p.text for p in item.content)
            elif isinstance(item, rs.ReasoningItem):
                msg.reasoning_content = "".join(p.text for p in item.content)
            else:
                call = ToolCall(FunctionCall(item.name, item.arguments), item.call_id)
                msg.tool_calls = [*(msg.tool_calls or ()), call]
        return msg

    def _start_call(self, call_id: str, name: str, events: list[rs.StreamEvent]) -> None:
        self.close(events)
        item = rs.FunctionCallItem(new_id("fc_"), call_id, name, "", "in_progress")
        self._calls[call_id] = (item, self._count)
        events.append(_event("response.output_item.added", self._count, item=item))
        self._count += 1

    def _end_call(self, call_id: str, name: str, arguments: str,
                  events: list[rs.StreamEvent]) -> None:
        if call_id not in self._calls:  # completed without pieces
            self._start_call(call_id, name, events)
        item, index = self._calls.pop(call_id)
        events.append(_event("response.function_call_arguments.done", index, item_id=item.id,
                             name=name, arguments=arguments))
        done = msgspec.structs.replace(item, arguments=arguments, status="completed")
        self._finish(done, index, events)

    def _piece(self, kind: str, event: str, text: str, events: list[rs.StreamEvent]) -> None:
        if self._open != kind:
            self.close(events)
            self._start(kind, events)
        self._text.append(text)
        logprobs = [] if kind == "message" else None
        events.append(_event(event, delta=text, logprobs=logprobs, **self._where()))

    def _start(self, kind: str, events: list[rs.StreamEvent]) -> None:
        self._open, self._text, self._index = kind, [], self._count
        self._count += 1
        if kind == "message":
            self._id = new_id("msg_")
            item: rs.OutputItem = rs.MessageItem(self._id, [], "in_progress")
            events.append(_event("response.output_item.added", self._index, item=item))
            events.append(_event("response.content_part.added", part=rs.OutputText(""),
                                 **self._where()))
        else:
            self._id = new_id("rs_")
            item = rs.ReasoningItem(self._id, [], status="in_progress")
            events.append(_event("response.output_item.added", self._index, item=item))

    def _finish(self, item: rs.OutputItem, index: int, events: list[rs.StreamEvent]) -> None:
        events.append(_event("response.output_item.done", index, item=item))
        self.items.append(item)

    def _where(self) -> dict:
        return dict(item_id=self._id, output_index=self._index, content_index=0)


def _event(kind: str, output_index: int | None = None, **fields) -> rs.StreamEvent:
    return rs.StreamEvent(kind, 0, output_index=output_index, **fields)


def response(gen: Generation, req: rs.ResponsesRequest, items: OutputItems, final: bool
             ) -> rs.Response:
    proc = gen.processors[0]
    incomplete = final and proc.finish_reason == FINISH_LENGTH
    status = ("incomplete" if incomplete else "completed") if final else "in_progress"
    usage = None
    if final:
        u = gen.usage()
        cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
        usage = rs.ResponseUsage(u.prompt_tokens, u.completion_tokens, u.total_tokens,
                                 rs.InputTokensDetails(cached), rs.OutputTokensDetails())
    return rs.Response(
        id=gen.ids.id, created_at=gen.ids.created, model=gen.ids.model, status=status,
        output=list(items.items) if final else [], usage=usage, instructions=req.instructions,
        previous_response_id=req.previous_response_id, tools=req.tools or [],
        tool_choice=req.tool_choice or "auto", parallel_tool_calls=req.parallel_tool_calls,
        max_output_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
        incomplete_details=rs.IncompleteDetails("max_output_tokens") if incomplete else None,
        metadata=req.metadata or {}, text=req.text or rs.TextConfig(rs.TextFormat()),
    )


# ---------------------------------------------------------------- streaming


class _Numbered:
    """Writes events as SSE with consecutive sequence numbers."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self, events: list[rs.StreamEvent]) -> bytes:
        out = []
        for e in events:
            e.sequence_number, self.next = self.next, self.next + 1
            out.append(b"event: " + e.type.encode() + b"\ndata: " + _ENCODER.encode(e) + b"\n\n")
        return b"".join(out)


async def _stream(gen: Generation, responder: Responder, req: rs.ResponsesRequest,
                  items: OutputItems) -> None:
    write = _Numbered()

    def opening() -> bytes:
        start = response(gen, req, items, final=False)
        return write([rs.StreamEvent("response.created", 0, response=start),
                      rs.StreamEvent("response.in_progress", 0, response=start)])

    def closing() -> bytes:
        done = response(gen, req, items, final=True)
        kind = "response.incomplete" if done.status == "incomplete" else "response.completed"
        return write([rs.StreamEvent(kind, 0, response=done)])

    def error_event(exc: ApiError) -> bytes:
        return write([rs.StreamEvent("error", 0, message=exc.message, code=exc.code or exc.type,
                                     param=exc.param)])

    def encode(d: ChoiceDelta) -> bytes:
        head = opening() if write.next == 0 else b""  # numbered before the first delta's events
        return head + write(items.delta(d))

    await stream_sse(gen, responder, encode, lambda: b"", closing, done=b"",
                     error_event=error_event)
