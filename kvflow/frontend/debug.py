"""POST /debug/route: where a request would be routed now, and why (changes nothing).

Body: {"model": ..., "prompt": "..."} or {"model": ..., "messages": [...]}, with the
session key (X-Session-Id header or `user`) when there is one. The answer is the
router's decision for that prompt: the chosen worker, and for every worker its
cached-prefix overlap (of which `pending`: routed there, not yet confirmed by KV
events), load, cost and the cost's terms in blocks of prefill work — `wait` (prefill
queued there), `prefill` (what it must compute), `saved` (what its cache spares) and
`decode` (weighted decode load); `session_worker` / `session_blocks` say where the
session's history is.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from kvflow.frontend.errors import ApiError
from kvflow.frontend.handlers import (
    FrontendState,
    cache_salt,
    decode_body,
    resolve_model,
    routing_hints,
)
from kvflow.frontend.http_response import HttpRequest, Responder
from kvflow.frontend.preprocess import tokenize_chat, tokenize_completion
from kvflow.llm.openai import ChatCompletionRequest, CompletionRequest
from kvflow.llm.protocol import PreprocessedRequest

Explainer = Callable[[PreprocessedRequest], bytes]


class _Probe(msgspec.Struct):
    model: str
    messages: list | None = None
    cache_salt: str | None = None


_probe = msgspec.json.Decoder(_Probe)
_chat = msgspec.json.Decoder(ChatCompletionRequest)
_completion = msgspec.json.Decoder(CompletionRequest)


async def explain_route(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    probe = decode_body(_probe, request.body)
    kind = "chat" if probe.messages is not None else "completions"
    model = resolve_model(state.models, probe.model, kind)
    if model.explain is None:
        raise ApiError(404, f"Model '{probe.model}' is not served through a router; nothing to "
                       "explain.", param="model", code="not_routed")
    if kind == "chat":
        chat = decode_body(_chat, request.body)
        ids, user = tokenize_chat(model, chat).ids, chat.user
    else:
        completion = decode_body(_completion, request.body)
        ids, user = tokenize_completion(model, completion)[0], completion.user
    probe_request = PreprocessedRequest("debug-route", ids, model=model.name,
                                        cache_salt=cache_salt(request, probe.cache_salt),
                                        routing=routing_hints(request, user))
    decision = model.explain(probe_request)
    responder.send(200, decision)
