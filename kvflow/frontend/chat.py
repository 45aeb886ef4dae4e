"""POST /v1/chat/completions: decode → template + tokenize → generate → JSON or SSE chunks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from kvflow.frontend import limits
from kvflow.frontend import preprocess as pre
from kvflow.frontend.generation import ChunkPrefixes, Generation, ResponseIds, stream_sse
from kvflow.frontend.handlers import (
    FrontendState,
    cache_salt,
    claim_request_id,
    decode_body,
    in_own_task,
    new_id,
    request_id,
    resolve_model,
    routing_hints,
    tracked,
)
from kvflow.frontend.http_response import HttpRequest, Responder
from kvflow.frontend.logprobs import chat_logprobs
from kvflow.frontend.postprocess import ChoiceDelta
from kvflow.llm.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDelta,
    ToolCallOut,
    Usage,
)
from kvflow.llm.tokenizer import Tokenizer
from kvflow.runtime.context import Context

_DECODER = msgspec.json.Decoder(ChatCompletionRequest)
_ENCODER = msgspec.json.Encoder()
_encode_str = _ENCODER.encode
_CONTENT_TAIL = b'},"logprobs":null,"finish_reason":null}]}\n\n'


async def handle_chat(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    body: ChatCompletionRequest = decode_body(_DECODER, request.body)

    async def respond(gen: Generation, prepared: pre.Prepared) -> None:
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            await in_own_task(_stream(gen, responder, include_usage, prepared.options.logprobs))
        else:
            await _collect(gen, responder, prepared.options.logprobs)

    await run_chat(state, request, responder, body, ChatRun("chat_completions", "chatcmpl-"),
                   respond)


@dataclass(frozen=True, slots=True)
class ChatRun:
    """How one API names a chat-shaped request: its metrics endpoint label and id prefix."""

    endpoint: str
    id_prefix: str


Respond = Callable[[Generation, "pre.Prepared"], Awaitable[None]]


async def run_chat(
    state: FrontendState, request: HttpRequest, responder: Responder,
    body: ChatCompletionRequest, run: ChatRun, respond: Respond,
) -> None:
    """The chat pipeline every chat-shaped API shares (chat completions, Anthropic Messages,
    Responses): validate → resolve the model → limits → admission → template + tokenize →
    Generation, handed to `respond` to write in the API's own shape."""
    pre.validate_chat(body)
    model = resolve_model(state.models, body.model, "chat")
    limits.check_chat(state.config, model, body)
    salt = cache_salt(request, body.cache_salt)
    hints = routing_hints(request, body.user)

    async def serve() -> None:
        chars = pre.chat_prompt_chars(body)
        prompt = await pre.run_maybe_offloaded(
            state.executor, chars, state.config.offload_prompt_chars,
            lambda: pre.tokenize_chat(model, body),
        )
        response_id = new_id(run.id_prefix)
        engine_id = request_id(request, response_id)
        prepared = pre.prepare_chat(model, body, prompt, engine_id, salt, hints)
        context = Context(engine_id)
        responder.on_disconnect(context.stop_generating)
        await respond(Generation(model, prepared, context, record, response_id), prepared)

    with claim_request_id(state, request):
        async with state.admission.slot(model.name):
            record = state.metrics.request(model.name, run.endpoint)
            await tracked(record, serve())


# ---------------------------------------------------------------- streaming


class ChatChunkEncoder:
    """Builds SSE chunks; the plain content chunk is two constant byte strings and one encode."""

    def __init__(self, ids: ResponseIds, tokenizer: Tokenizer, top_logprobs: int | None) -> None:
        self.ids = ids
        self._tokenizer = tokenizer
        self._top = top_logprobs
        self._prefix = ChunkPrefixes(ids, b"chat.completion.chunk", b'"delta":{"content":')

    def content(self, index: int, text: str) -> bytes:
        return self._prefix(index) + _encode_str(text) + _CONTENT_TAIL

    def role(self, index: int) -> bytes:
        return self._chunk([ChatChunkChoice(index, ChatDelta(role="assistant", content=""))])

    def delta(self, d: ChoiceDelta) -> bytes:
        if d.reasoning or d.tool_pieces or d.logprobs or d.finish_reason:
            return self._chunk([self._choice(d)])
        return self.content(d.index, d.text) if d.text else b""

    def usage(self, usage: Usage) -> bytes:
        return self._chunk([], usage)

    def _choice(self, d: ChoiceDelta) -> ChatChunkChoice:
        calls = None
        if d.tool_pieces:  # arguments stream as the model writes them
            calls = [
                ToolCallDelta(p.index, p.id, "function" if p.id else None,
                              FunctionCallDelta(p.name, p.arguments))
                for p in d.tool_pieces
            ]
        delta = ChatDelta(content=d.text or None, reasoning_content=d.reasoning or None,
                          tool_calls=calls)
        logprobs = None
        if d.logprobs is not None and self._top is not None:
            logprobs = ChatLogprobs(chat_logprobs(self._tokenizer, d.logprobs, self._top))
        return ChatChunkChoice(d.index, delta, d.finish_reason, logprobs)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        ids = self.ids
        chunk = ChatCompletionChunk(ids.id, ids.created, ids.model, choices, usage)
        return b"data: " + _ENCODER.encode(chunk) + b"\n\n"


async def _stream(
    gen: Generation, responder: Responder, include_usage: bool, top: int | None
) -> None:
    enc = ChatChunkEncoder(gen.ids, gen.model.tokenizer, top)
    await stream_sse(
        gen, responder, enc.delta,
        opening=lambda: b"".join(enc.role(i) for i in sorted(gen.processors)),
        closing=lambda: enc.usage(gen.usage()) if include_usage else b"",
    )


# ---------------------------------------------------------------- whole response


async def _collect(gen: Generation, responder: Responder, top: int | None) -> None:
    parts: dict[int, _Collected] = {i: _Collected() for i in gen.processors}
    async for d in gen.deltas():
        parts[d.index].add(d, gen.model.tokenizer, top)
    choices = [parts[i].choice(i) for i in sorted(parts)]
    ids = gen.ids
    response = ChatCompletionResponse(ids.id, ids.created, ids.model, choices, gen.usage())
    body = _ENCODER.encode(response)
    responder.send(200, gen.timeline.extend_json(body) if gen.timeline else body)


class _Collected:
    """One choice's deltas, gathered for a non-streamed response."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ToolCallOut] = []
        self.logprobs: ChatLogprobs | None = None
        self.finish_reason: str | None = None

    def add(self, d: ChoiceDelta, tokenizer: Tokenizer, top: int | None) -> None:
        self.text.append(d.text)
        self.reasoning.append(d.reasoning)
        for c in d.tool_calls or ():
            self.calls.append(ToolCallOut(c.id, FunctionCallOut(c.name, c.arguments)))
        if d.logprobs is not None and top is not None:
            if self.logprobs is None:
                self.logprobs = ChatLogprobs([])
            self.logprobs.content.extend(chat_logprobs(tokenizer, d.logprobs, top))
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason

    def choice(self, index: int) -> ChatChoice:
        text = "".join(self.text)
        message = AssistantMessage(
            role="assistant",
            content=text if text or not self.calls else None,
            reasoning_content="".join(self.reasoning) or None,
            tool_calls=self.calls or None,
        )
        return ChatChoice(index, message, self.finish_reason, self.logprobs)
