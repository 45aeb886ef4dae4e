"""POST /v1/completions: decode → tokenize prompt(s) → generate → JSON or SSE chunks."""

from __future__ import annotations

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
from kvflow.frontend.logprobs import CompletionLogprobsBuilder
from kvflow.frontend.postprocess import ChoiceDelta
from kvflow.llm.openai import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from kvflow.llm.tokenizer import Tokenizer
from kvflow.runtime.context import Context

_DECODER = msgspec.json.Decoder(CompletionRequest)
_ENCODER = msgspec.json.Encoder()
_encode_str = _ENCODER.encode
_TEXT_TAIL = b',"finish_reason":null,"logprobs":null}]}\n\n'


async def handle_completion(
    state: FrontendState, request: HttpRequest, responder: Responder
) -> None:
    body: CompletionRequest = decode_body(_DECODER, request.body)
    pre.validate_completion(body)
    model = resolve_model(state.models, body.model, "completions")
    limits.check_completion(state.config, model, body)
    salt = cache_salt(request, body.cache_salt)
    hints = routing_hints(request, body.user)

    async def serve() -> None:
        prompts = await pre.run_maybe_offloaded(
            state.executor, pre.completion_prompt_chars(body), state.config.offload_prompt_chars,
            lambda: pre.tokenize_completion(model, body),
        )
        response_id = new_id("cmpl-")
        engine_id = request_id(request, response_id)
        prepared = pre.prepare_completion(model, body, prompts, engine_id, salt, hints)
        context = Context(engine_id)
        responder.on_disconnect(context.stop_generating)
        gen = Generation(model, prepared, context, record, response_id)
        texts = _Texts(prepared, model.tokenizer, body.logprobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            await in_own_task(_stream(gen, responder, texts, include_usage))
        else:
            await _collect(gen, responder, texts)

    with claim_request_id(state, request):
        async with state.admission.slot(model.name):
            record = state.metrics.request(model.name, "completions")
            await tracked(record, serve())


class _Texts:
    """Per-choice echo text and logprob builders (each choice's offsets count from its echo)."""

    def __init__(self, prepared: pre.Prepared, tokenizer: Tokenizer, top: int | None) -> None:
        self.echo = {c.index: c.echo for c in prepared.choices}
        self.logprobs = {
            c.index: CompletionLogprobsBuilder(tokenizer, top, offset=len(c.echo))
            for c in prepared.choices
        } if top is not None else None

    def choice(self, d: ChoiceDelta) -> CompletionChoice:
        """The stream choice of one delta (its logprobs, if wanted, cover just this delta)."""
        logprobs = None
        if self.logprobs is not None and d.logprobs is not None:
            logprobs = self.logprobs[d.index].add(d.logprobs)
        return CompletionChoice(d.index, d.text, d.finish_reason, logprobs)


class CompletionChunkEncoder:
    """Builds SSE chunks; the plain text chunk is two constant byte strings and one encode."""

    def __init__(self, ids: ResponseIds) -> None:
        self.ids = ids
        self._prefix = ChunkPrefixes(ids, b"text_completion", b'"text":')

    def text(self, index: int, text: str) -> bytes:
        return self._prefix(index) + _encode_str(text) + _TEXT_TAIL

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        ids = self.ids
        chunk = CompletionChunk(ids.id, ids.created, ids.model, choices, usage)
        return b"data: " + _ENCODER.encode(chunk) + b"\n\n"


async def _stream(
    gen: Generation, responder: Responder, texts: _Texts, include_usage: bool
) -> None:
    enc = CompletionChunkEncoder(gen.ids)

    def encode(d: ChoiceDelta) -> bytes:
        if d.finish_reason is None and d.logprobs is None:
            return enc.text(d.index, d.text) if d.text else b""
        return enc.chunk([texts.choice(d)])

    await stream_sse(
        gen, responder, encode,
        opening=lambda: _echo_chunks(enc, texts),
        closing=lambda: enc.chunk([], gen.usage()) if include_usage else b"",
    )


def _echo_chunks(enc: CompletionChunkEncoder, texts: _Texts) -> bytes:
    return b"".join(enc.text(i, echo) for i, echo in sorted(texts.echo.items()) if echo)


async def _collect(gen: Generation, responder: Responder, texts: _Texts) -> None:
    parts: dict[int, list[str]] = {i: [texts.echo[i]] for i in gen.processors}
    finish: dict[int, str | None] = dict.fromkeys(gen.processors)
    async for d in gen.deltas():
        parts[d.index].append(d.text)
        if d.logprobs is not None and texts.logprobs is not None:
            texts.logprobs[d.index].add(d.logprobs)
        if d.finish_reason is not None:
            finish[d.index] = d.finish_reason
    choices = [
        CompletionChoice(
            i, "".join(parts[i]), finish[i],
            texts.logprobs[i].result if texts.logprobs is not None else None,
        )
        for i in sorted(parts)
    ]
    ids = gen.ids
    response = CompletionResponse(ids.id, ids.created, ids.model, choices, gen.usage())
    body = _ENCODER.encode(response)
    responder.send(200, gen.timeline.extend_json(body) if gen.timeline else body)
