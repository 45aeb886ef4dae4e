"""POST /v1/embeddings: texts or token ids → one embedding request per input on the model's workers.

Inputs are bounded and tokenized as /v1/completions prompts are; each becomes an engine
request carrying `EmbedOptions`, run through the model's routed engine client (routing,
migration, admission and metrics as for generation). Engines serve it when their card
lists "embedding" (the native engine does, on its ordinary worker).
"""

from __future__ import annotations

import base64
import struct

import msgspec

from kvflow.frontend import limits
from kvflow.frontend import preprocess as pre
from kvflow.frontend.admission import EngineOverloaded
from kvflow.frontend.engine_client import EngineUnavailable
from kvflow.frontend.errors import (
    ApiError,
    engine_failed,
    model_not_found,
    no_workers,
    overloaded,
    worker_lost,
)
from kvflow.frontend.handlers import (
    FrontendState,
    claim_request_id,
    decode_body,
    new_id,
    request_id,
    tracked,
)
from kvflow.frontend.http_response import HttpRequest, Responder
from kvflow.frontend.migration import MigrationFailed
from kvflow.frontend.models import ServedModel
from kvflow.frontend.preprocess import ChoiceInput
from kvflow.frontend.streams import ChoiceStreams
from kvflow.llm import embeddings as em
from kvflow.llm.openai import CompletionRequest
from kvflow.llm.protocol import FINISH_STOP, EmbedOptions, PreprocessedRequest, StopConditions
from kvflow.runtime.context import Context

_DECODER = msgspec.json.Decoder(em.EmbeddingRequest)
_ENCODER = msgspec.json.Encoder()


async def handle_embeddings(state: FrontendState, request: HttpRequest, responder: Responder
                            ) -> None:
    body: em.EmbeddingRequest = decode_body(_DECODER, request.body)
    model = _resolve(state, body.model)
    as_prompt = CompletionRequest(model=body.model, prompt=body.input)
    limits.check_completion(state.config, model, as_prompt)
    prompts = await pre.run_maybe_offloaded(
        state.executor, pre.completion_prompt_chars(as_prompt), state.config.offload_prompt_chars,
        lambda: pre.tokenize_completion(model, as_prompt))
    if len(prompts) > state.config.max_choices:
        raise ApiError(400, f"input has {len(prompts)} items; send at most "
                       f"{state.config.max_choices} per request.", param="input")

    async def serve() -> None:
        response_id = new_id("embd-")
        engine_id = request_id(request, response_id)
        choices = _choices(model, body, prompts, engine_id)
        context = Context(engine_id)
        responder.on_disconnect(context.stop_generating)
        vectors = await _run(model, choices, context)
        data = [em.EmbeddingData(i, _encode(vectors[i], body.encoding_format))
                for i in range(len(prompts))]
        used = sum(len(p) for p in prompts)
        out = em.EmbeddingResponse(data, model.name, em.EmbeddingUsage(used, used))
        responder.send(200, _ENCODER.encode(out))

    with claim_request_id(state, request):
        async with state.admission.slot(model.name):
            record = state.metrics.request(model.name, "embeddings")
            await tracked(record, serve())


def _resolve(state: FrontendState, name: str) -> ServedModel:
    model = state.models.get(name)
    if model is None:
        raise model_not_found(name, state.models.names())
    if not model.serves("embedding"):
        raise ApiError(400, f"Model '{name}' does not serve embeddings (its engine does not "
                       "offer them); use a model served by the native engine.", param="model",
                       code="unsupported_endpoint")
    if model.engine.live_workers() <= 0:
        raise no_workers(name)
    return model


def _choices(model: ServedModel, body: em.EmbeddingRequest, prompts: list[list[int]],
             engine_id: str) -> list[ChoiceInput]:
    opts = EmbedOptions(body.pooling, body.normalize, body.dimensions)
    choices = []
    for i, ids in enumerate(prompts):
        if len(ids) > model.context_length:
            param = "input" if len(prompts) == 1 else f"input[{i}]"
            raise ApiError(400, f"{param} has {len(ids)} tokens; this model's maximum context "
                           f"length is {model.context_length}. Shorten it.", param=param,
                           code="context_length_exceeded")
        rid = engine_id if len(prompts) == 1 else f"{engine_id}-{i}"
        req = PreprocessedRequest(rid, ids, model=model.name, stop=StopConditions(max_tokens=1),
                                  eos_token_ids=list(model.card.eos_token_ids), embed=opts)
        choices.append(ChoiceInput(i, req))
    return choices


async def _run(model: ServedModel, choices: list[ChoiceInput], context: Context
               ) -> dict[int, list[float]]:
    streams = ChoiceStreams(model.engine, choices, context)
    vectors: dict[int, list[float]] = {}
    try:
        async for out in streams:
            if out.error is not None or out.finish_reason not in (None, FINISH_STOP):
                raise engine_failed(out.error or f"finish reason {out.finish_reason!r}")
            if out.embedding is not None:
                vectors[out.index] = out.embedding
                streams.finished(out.index)
    except EngineOverloaded as exc:
        raise overloaded(model.name, str(exc), exc.retry_after_s) from exc
    except MigrationFailed as exc:
        raise worker_lost(str(exc)) from exc
    except EngineUnavailable as exc:
        raise no_workers(model.name, str(exc)) from exc
    finally:
        await streams.aclose()
    missing = [c.index for c in choices if c.index not in vectors]
    if missing:
        raise engine_failed(f"the engine returned no embedding for input {missing[0]}")
    return vectors


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
