"""The OpenAPI 3.1 document served at /openapi.json, generated from the msgspec types."""

from __future__ import annotations

from typing import Any

import msgspec

import kvflow
from kvflow.llm import anthropic as an
from kvflow.llm import embeddings as em
from kvflow.llm import openai as oa
from kvflow.llm import responses as rs
from kvflow.llm import tokenize as tk

_REF = "#/components/schemas/{name}"
_SCHEMA_TYPES = (
    oa.ChatCompletionRequest,
    oa.CompletionRequest,
    oa.ChatCompletionResponse,
    oa.ChatCompletionChunk,
    oa.CompletionResponse,
    oa.CompletionChunk,
    oa.ModelList,
    oa.ErrorResponse,
    an.MessagesRequest,
    an.MessageResponse,
    an.CountTokensRequest,
    an.CountTokensResponse,
    an.ErrorEvent,
    rs.ResponsesRequest,
    rs.Response,
    tk.TokenizeRequest,
    tk.TokenizeResponse,
    tk.DetokenizeRequest,
    tk.DetokenizeResponse,
    em.EmbeddingRequest,
    em.EmbeddingResponse,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _errors(*codes: int, schema: str = "ErrorResponse") -> dict[str, Any]:
    text = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model",
            409: "X-Request-Id already in flight", 413: "Request body too large",
            429: "Model at its in-flight limit and queue; see Retry-After",
            431: "Request headers too large",
            503: "No live worker for the model, or all busy; see Retry-After"}
    return {str(c): {"description": text[c], "content": _json(schema)} for c in codes}


def _generation(summary: str, request: str, response: str, chunk: str,
                error: str = "ErrorResponse") -> dict[str, Any]:
    ok = {
        "description": "The whole result, or with `stream: true` server-sent events: "
        f"{chunk}.",
        "content": {
            **_json(response),
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {"200": ok, **_errors(400, 401, 404, 409, 413, 429, 431, 503,
                                               schema=error)},
        }
    }


def _utility(summary: str, request: str, response: str, error: str = "ErrorResponse"
             ) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {"200": {"description": "OK", "content": _json(response)},
                          **_errors(400, 401, 404, 413, schema=error)},
        }
    }


def _plain(summary: str, content_type: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": {content_type: {}}}},
        }
    }


def build_openapi() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_SCHEMA_TYPES, ref_template=_REF)
    models = {
        "get": {
            "summary": "List the models being served",
            "responses": {"200": {"description": "OK", "content": _json("ModelList")},
                          **_errors(401)},
        }
    }
    paths = {
        "/v1/chat/completions": _generation(
            "Create a chat completion", "ChatCompletionRequest", "ChatCompletionResponse",
            "each `data:` line a ChatCompletionChunk and the last `data: [DONE]`",
        ),
        "/v1/completions": _generation(
            "Create a text completion", "CompletionRequest", "CompletionResponse",
            "each `data:` line a CompletionChunk and the last `data: [DONE]`",
        ),
        "/v1/messages": _generation(
            "Create a message (Anthropic Messages API)", "MessagesRequest", "MessageResponse",
            "message_start, content_block_start/delta/stop per block, message_delta, "
            "message_stop (each `event:` line names the event)", error="ErrorEvent",
        ),
        "/v1/messages/count_tokens": _utility(
            "Count a message request's input tokens (Anthropic Messages API)",
            "CountTokensRequest", "CountTokensResponse", error="ErrorEvent",
        ),
        "/v1/responses": _generation(
            "Create a model response (OpenAI Responses API)", "ResponsesRequest", "Response",
            "response.created, response.in_progress, per output item its added/delta/done "
            "events, then response.completed or response.incomplete",
        ),
        "/v1/embeddings": _utility(
            "Create embeddings (last-token or mean pooling of the model's final hidden states)",
            "EmbeddingRequest", "EmbeddingResponse"),
        "/tokenize": _utility("Tokenize text or chat messages with the model's tokenizer",
                              "TokenizeRequest", "TokenizeResponse"),
        "/detokenize": _utility("Turn token ids back into text", "DetokenizeRequest",
                                "DetokenizeResponse"),
        "/v1/models": models,
        "/health": _plain("Ready: 200 when a model has a live worker", "application/json"),
        "/live": _plain("Alive: 200 while the process serves HTTP", "application/json"),
        "/metrics": _plain("Prometheus metrics", "text/plain"),
        "/openapi.json": _plain("This document", "application/json"),
        "/debug/route": {
            "post": {
                "summary": "Explain where a prompt would be routed now (each worker's cached "
                "overlap, load and cost); changes nothing",
                "requestBody": {"required": True, "content": _json("CompletionRequest")},
                "responses": {"200": {"description": "The routing decision",
                                      "content": {"application/json": {}}},
                              **_errors(400, 404, 503)},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvflow OpenAI-compatible API", "version": kvflow.__version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "x-api-key": {"type": "apiKey", "in": "header",
                                              "name": "x-api-key"}},
        },
    }


def openapi_bytes() -> bytes:
    return msgspec.json.encode(build_openapi())
