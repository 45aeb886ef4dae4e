"""HttpFrontend: the OpenAI-compatible HTTP server — routes, auth, TLS, start and stop."""

from __future__ import annotations

import ssl
from concurrent.futures import ThreadPoolExecutor

from kvflow.frontend import handlers
from kvflow.frontend.admission import AdmissionControl
from kvflow.frontend.anthropic import handle_count_tokens, handle_messages
from kvflow.frontend.chat import handle_chat
from kvflow.frontend.completions import handle_completion
from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.debug import explain_route
from kvflow.frontend.embeddings import handle_embeddings
from kvflow.frontend.errors import ApiError
from kvflow.frontend.handlers import FrontendState, Handler
from kvflow.frontend.http import HttpServer
from kvflow.frontend.http_response import HttpRequest, Responder
from kvflow.frontend.metrics import FrontendMetrics
from kvflow.frontend.models import ModelManager
from kvflow.frontend.openapi import openapi_bytes
from kvflow.frontend.responses import handle_responses
from kvflow.frontend.tokenize import handle_detokenize, handle_tokenize

ROUTES: dict[str, dict[str, Handler]] = {
    "/v1/chat/completions": {"POST": handle_chat},
    "/v1/completions": {"POST": handle_completion},
    "/v1/models": {"GET": handlers.list_models},
    "/health": {"GET": handlers.health},
    "/live": {"GET": handlers.live},
    "/metrics": {"GET": handlers.metrics},
    "/openapi.json": {"GET": handlers.openapi},
    "/debug/route": {"POST": explain_route},
    # Other APIs, each translated onto the same pipeline in a module of its own.
    "/v1/messages": {"POST": handle_messages},
    "/v1/messages/count_tokens": {"POST": handle_count_tokens},
    "/v1/responses": {"POST": handle_responses},
    "/v1/embeddings": {"POST": handle_embeddings},
    "/tokenize": {"POST": handle_tokenize},
    "/detokenize": {"POST": handle_detokenize},
}


class HttpFrontend:
    """Serves `models` over HTTP. `await start()` → (host, port); `await stop()`."""

    def __init__(self, config: FrontendConfig, models: ModelManager) -> None:
        self.config = config
        self.models = models
        self.metrics = FrontendMetrics()
        self._executor = ThreadPoolExecutor(
            max_workers=config.preprocess_threads, thread_name_prefix="kvflow-preprocess"
        )
        self.admission = AdmissionControl(config.admission_limits(), self.metrics.count_rejected)
        self._state = FrontendState(config, models, self.metrics, self._executor, openapi_bytes(),
                                    self.admission)
        self._server = HttpServer(
            self._dispatch,
            max_body_bytes=config.max_body_bytes,
            keepalive_timeout_s=config.keepalive_timeout_s,
            max_pipelined=config.max_pipelined_requests,
            max_header_bytes=config.max_header_bytes,
        )
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        """Bind and serve; returns the bound (host, port) (port 0 in the config picks one)."""
        c = self.config
        self.address = await self._server.start(
            c.host, c.port, ssl_context=self._ssl_context(), backlog=c.backlog
        )
        return self.address

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, give in-flight requests `grace_s` to finish, then close."""
        await self._server.stop(grace_s)
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def base_url(self) -> str:
        assert self.address is not None, "start() the frontend first"
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{self.address[0]}:{self.address[1]}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return ctx

    async def _dispatch(self, request: HttpRequest, responder: Responder) -> None:
        methods = ROUTES.get(request.path)
        if methods is None:
            raise ApiError(
                404, f"No route {request.path}; see /openapi.json for the API.",
                code="not_found",
            )
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            raise ApiError(
                405, f"{request.method} is not allowed on {request.path}; use {allowed}.",
                code="method_not_allowed",
            )
        if request.path.startswith("/v1/"):
            handlers.check_api_key(self.config, request)
        await handler(self._state, request, responder)
