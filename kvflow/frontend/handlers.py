"""Route handlers shared by all endpoints: state, body decoding, model lookup, small routes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from kvflow.frontend.admission import AdmissionControl
from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.errors import ApiError, from_decode_error, model_not_found, no_workers
from kvflow.frontend.http_response import JSON, HttpRequest, Responder
from kvflow.frontend.metrics import CONTENT_TYPE, FrontendMetrics, RequestRecord
from kvflow.frontend.models import ModelManager, ServedModel
from kvflow.frontend.planner_feed import PlannerFeed
from kvflow.frontend.responses_request import ResponseStore
from kvflow.llm.openai import ModelList, ModelObject
from kvflow.llm.protocol import RoutingHints

T = TypeVar("T")
MAX_REQUEST_ID_CHARS = 256
MAX_CACHE_SALT_CHARS = 256
MAX_SESSION_ID_CHARS = 256
SESSION_HEADER = "x-session-id"
_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True)
class FrontendState:
    """What every handler may use; built once by HttpFrontend."""

    config: FrontendConfig
    models: ModelManager
    metrics: FrontendMetrics
    executor: Executor | None
    openapi: bytes
    admission: AdmissionControl
    # X-Request-Id values of requests in flight (see claim_request_id).
    caller_ids: set[str] = field(default_factory=set)
    # /v1/responses: recent responses for previous_response_id (bounded, this process only).
    responses: ResponseStore = field(init=False)
    # The planner's latest decisions from the event plane, for /fleet (cli/frontend.py feeds it).
    planner: PlannerFeed = field(default_factory=PlannerFeed)

    def __post_init__(self) -> None:
        object.__setattr__(self, "responses", ResponseStore(self.config.responses_store_size))


Handler = Callable[[FrontendState, HttpRequest, Responder], Awaitable[None]]


def decode_body(decoder: msgspec.json.Decoder, body: bytes) -> T:  # type: ignore[type-var]
    if not body:
        raise ApiError(400, "Request body is empty; send a JSON object.")
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise from_decode_error(exc) from None
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, f"Request body is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
            "send UTF-8 encoded JSON.") from None
    except RecursionError:
        raise ApiError(
            400, "Request body nests JSON arrays/objects too deeply; flatten it.") from None


def resolve_model(models: ModelManager, name: str, kind: str) -> ServedModel:
    """The served model called `name`; 404 if unknown, 400 if it does not serve `kind`
    ("chat" / "completions"), 503 if it has no live worker."""
    model = models.get(name)
    if model is None:
        raise model_not_found(name, models.names())
    if not model.serves(kind):
        other = "/v1/completions" if kind == "chat" else "/v1/chat/completions"
        raise ApiError(
            400, f"Model '{name}' does not serve {kind}; use {other}.", param="model",
            code="unsupported_endpoint",
        )
    if model.engine.live_workers() <= 0:
        left = models.restarting().get(name)
        raise no_workers(name, f"its workers are restarting; {left:.0f} s of grace left"
                         if left is not None else "")
    return model


def cache_salt(request: HttpRequest, body_salt: str | None) -> str | None:
    """The request's cache salt: the `x-cache-salt` header (an auth proxy sets it per tenant)
    and the body's `cache_salt`, each tagged, so a body cannot choose a header's salt."""
    header = request.headers.get("x-cache-salt")
    if header is not None and not 0 < len(header) <= MAX_CACHE_SALT_CHARS:
        raise ApiError(400, f"x-cache-salt must be 1 to {MAX_CACHE_SALT_CHARS} characters.",
                       param="x-cache-salt")
    parts = [f"{tag}:{salt}" for tag, salt in (("h", header), ("b", body_salt)) if salt]
    return "\n".join(parts) or None


def routing_hints(request: HttpRequest, user: str | None) -> RoutingHints | None:
    """The router's hints from the request: its session key, from the X-Session-Id header
    or else the OpenAI `user` field (a conversation's turns then go where its history is)."""
    session = request.headers.get(SESSION_HEADER) or user
    if not session:
        return None
    if len(session) > MAX_SESSION_ID_CHARS:
        raise ApiError(400, f"The session key (X-Session-Id or user) is longer than "
                       f"{MAX_SESSION_ID_CHARS} characters; send a shorter one.",
                       param="x-session-id" if request.headers.get(SESSION_HEADER) else "user")
    return RoutingHints(session_id=session)


def request_id(request: HttpRequest, response_id: str) -> str:
    """The id the engine sees: the caller's X-Request-Id when given, else the response id."""
    return request.headers.get("x-request-id") or response_id


@contextmanager
def claim_request_id(state: FrontendState, request: HttpRequest) -> Iterator[None]:
    """Hold the caller's X-Request-Id while the request runs: engines and routers key
    requests by id, so a second request with an id in flight gets 409, not a clash."""
    rid = request.headers.get("x-request-id")
    if not rid:
        yield
        return
    if len(rid) > MAX_REQUEST_ID_CHARS:
        raise ApiError(400, f"X-Request-Id is longer than {MAX_REQUEST_ID_CHARS} characters; "
                       "send a shorter id.", param="x-request-id")
    if rid in state.caller_ids:
        raise ApiError(409, f"A request with X-Request-Id '{rid}' is already in flight; give "
                       "every request its own id.", param="x-request-id",
                       code="duplicate_request_id")
    state.caller_ids.add(rid)
    try:
        yield
    finally:
        state.caller_ids.discard(rid)


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


async def tracked(record: RequestRecord, work: Awaitable[None]) -> None:
    """Await `work`, then finish the request's metrics as success, cancelled or error."""
    try:
        await work
    except asyncio.CancelledError:
        record.finish("cancelled")
        raise
    except BaseException:
        record.finish("error")
        raise
    record.finish("success")


async def in_own_task(work: Coroutine[Any, Any, None]) -> None:
    """Await `work` as a task of its own.

    A streaming loop resumes once or twice per token; in its own task each resumption
    walks a short await chain instead of the whole HTTP handler stack. Cancelling the
    caller cancels the task.
    """
    await asyncio.get_running_loop().create_task(work)


# ---------------------------------------------------------------- small routes


async def list_models(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    data = [ModelObject(id=m.name, created=m.created) for m in state.models.list()]
    responder.send(200, _ENCODER.encode(ModelList(data=data)))


async def health(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    """Ready when at least one model has a live worker; lists models whose workers are restarting."""
    served = {m.name: m.engine.live_workers() for m in state.models.list()}
    ready = any(n > 0 for n in served.values())
    restarting = state.models.restarting()
    status = "ready" if ready else "restarting" if restarting else "not_ready"
    body = {"status": status, "models": served, "restarting": restarting}
    retry = (b"retry-after: 2\r\n",) if restarting and not ready else ()
    responder.send(200 if ready else 503, _ENCODER.encode(body), headers=retry)


async def live(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    responder.send(200, b'{"status":"live"}')


async def metrics(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    responder.send(200, state.metrics.render(), content_type=CONTENT_TYPE)


async def openapi(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    responder.send(200, state.openapi, content_type=JSON)
