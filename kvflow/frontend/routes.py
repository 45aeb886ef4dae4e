"""The route table: every HTTP route with its handlers and a declared access policy.

A `Route` cannot be built without an `access` class, so a new route has to say who may
call it. The classes, and what the config makes of them:

    inference   /v1/*: the API key (`--api-key`), when keys are set
    debug       /debug/*: the admin key (`--admin-api-key`), else the API key; off
                (404) with `--no-debug-routes` — it reveals which worker caches
                which prompt prefix, a probe of other users' prompts
    metrics     /metrics: `--metrics-access open|keyed|off` (default open)
    health      /health, /live: `--health-access open|keyed|off` (default open: probes)
    openapi     /openapi.json: `--openapi-access open|keyed|off` (default open)
    fleet       /fleet, /fleet/events, /fleet/snapshot: the API key, when keys are set; a
                browser may pass it as `?key=` (EventSource cannot send headers)

"keyed" takes an API key or an admin key; "off" serves the route nowhere on the HTTP
port (the status port, `--system-port`, still has /health, /live and /metrics).
"""

from __future__ import annotations

import hmac
import urllib.parse
from dataclasses import dataclass

from kvflow.frontend import handlers
from kvflow.frontend.anthropic import handle_count_tokens, handle_messages
from kvflow.frontend.chat import handle_chat
from kvflow.frontend.completions import handle_completion
from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.debug import explain_route
from kvflow.frontend.embeddings import handle_embeddings
from kvflow.frontend.errors import ApiError
from kvflow.frontend.fleet import fleet_events, fleet_page, fleet_snapshot
from kvflow.frontend.handlers import Handler
from kvflow.frontend.http_response import HttpRequest
from kvflow.frontend.responses import handle_responses
from kvflow.frontend.timeline import observed
from kvflow.frontend.tokenize import handle_detokenize, handle_tokenize

ACCESS_CLASSES = ("inference", "debug", "metrics", "health", "openapi", "fleet")
OPEN, KEYED, ADMIN, OFF = "open", "keyed", "admin", "off"


@dataclass(frozen=True)
class Route:
    path: str
    methods: dict[str, Handler]
    access: str  # one of ACCESS_CLASSES; required

    def __post_init__(self) -> None:
        if self.access not in ACCESS_CLASSES:
            raise ValueError(f"route {self.path}: access must be one of {ACCESS_CLASSES}, "
                             f"got {self.access!r}")


ROUTES: dict[str, Route] = {r.path: r for r in (
    Route("/v1/chat/completions", {"POST": observed(handle_chat, "chat_completions")}, "inference"),
    Route("/v1/completions", {"POST": observed(handle_completion, "completions")}, "inference"),
    Route("/v1/models", {"GET": handlers.list_models}, "inference"),
    Route("/health", {"GET": handlers.health}, "health"),
    Route("/live", {"GET": handlers.live}, "health"),
    Route("/metrics", {"GET": handlers.metrics}, "metrics"),
    Route("/openapi.json", {"GET": handlers.openapi}, "openapi"),
    Route("/debug/route", {"POST": explain_route}, "debug"),
    # Other APIs, each translated onto the same pipeline in a module of its own.
    Route("/v1/messages", {"POST": handle_messages}, "inference"),
    Route("/v1/messages/count_tokens", {"POST": handle_count_tokens}, "inference"),
    Route("/v1/responses", {"POST": handle_responses}, "inference"),
    Route("/v1/embeddings", {"POST": handle_embeddings}, "inference"),
    Route("/tokenize", {"POST": handle_tokenize}, "inference"),
    Route("/detokenize", {"POST": handle_detokenize}, "inference"),
    Route("/fleet", {"GET": fleet_page}, "fleet"),
    Route("/fleet/events", {"GET": fleet_events}, "fleet"),
    Route("/fleet/snapshot", {"GET": fleet_snapshot}, "fleet"),
)}


def policy(route: Route, config: FrontendConfig) -> str:
    """What `config` makes of the route's access class: open, keyed, admin or off."""
    access = route.access
    if access in ("inference", "fleet"):
        return KEYED
    if access == "debug":
        return ADMIN if config.debug_routes else OFF
    return getattr(config, f"{access}_access")


def check_access(route: Route, config: FrontendConfig, request: HttpRequest) -> None:
    """Raise 404 (off) or 401 (no valid key) unless the request may use `route`."""
    rule = policy(route, config)
    if rule == OPEN:
        return
    if rule == OFF:
        raise ApiError(404, f"No route {request.path}; it is switched off on this server.",
                       code="not_found")
    keys = config.admin_api_keys if rule == ADMIN and config.admin_api_keys else (
        config.api_keys + config.admin_api_keys)
    if keys and not _has_key(request, keys, query_key=route.access == "fleet"):
        raise ApiError(
            401, "Missing or invalid API key; send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            + (" with an admin key." if rule == ADMIN and config.admin_api_keys else "."),
            type="authentication_error", code="invalid_api_key")


def _has_key(request: HttpRequest, keys: tuple[str, ...], query_key: bool = False) -> bool:
    """A configured key in `Authorization: Bearer` (OpenAI clients), `x-api-key` (Anthropic
    clients) or, for the fleet page's browser feed, `?key=`."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    supplied = [token.strip()] if scheme.lower() == "bearer" else []
    if "x-api-key" in request.headers:
        supplied.append(request.headers["x-api-key"].strip())
    if query_key:
        supplied.append(urllib.parse.parse_qs(request.query).get("key", [""])[0])
    return any(hmac.compare_digest(value.encode(), key.encode())
               for value in supplied if value for key in keys)
