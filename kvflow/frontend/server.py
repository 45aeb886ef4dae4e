"""HttpFrontend: the OpenAI-compatible HTTP server — routes, auth, TLS, start and stop."""

from __future__ import annotations

import logging
import ssl
from concurrent.futures import ThreadPoolExecutor

from kvflow.frontend.admission import AdmissionControl
from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.errors import ApiError
from kvflow.frontend.handlers import FrontendState
from kvflow.frontend.http import HttpServer
from kvflow.frontend.http_response import HttpRequest, Responder
from kvflow.frontend.http_timeouts import raise_fd_limit
from kvflow.frontend.metrics import FrontendMetrics
from kvflow.frontend.models import ModelManager
from kvflow.frontend.openapi import openapi_bytes
from kvflow.frontend.planner_feed import PlannerFeed
from kvflow.frontend.routes import ROUTES, check_access

log = logging.getLogger(__name__)


def connection_limit(wanted: int, reserve: int = 256) -> int:
    """`wanted`, or less if the open-file limit (raised to its hard limit first) is lower."""
    files = raise_fd_limit()
    log.info("frontend: open-file limit %d; at most %d HTTP connections", files,
             min(wanted, max(files - reserve, 1)))
    if files - reserve < wanted:
        log.warning("frontend: the open-file limit (%d) allows only %d of the %d connections "
                    "asked for; raise `ulimit -n`", files, max(files - reserve, 1), wanted)
    return min(wanted, max(files - reserve, 1))


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
            timeouts=config.timeouts(),
            max_pipelined=config.max_pipelined_requests,
            max_header_bytes=config.max_header_bytes,
            max_connections=connection_limit(config.max_connections),
            on_close=self.metrics.count_closed,
        )
        self.metrics.connections_open.set_function(lambda: len(self._server.connections))
        self.address: tuple[str, int] | None = None

    @property
    def planner_feed(self) -> PlannerFeed:
        return self._state.planner

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
        route = ROUTES.get(request.path)
        if route is None:
            raise ApiError(
                404, f"No route {request.path}; see /openapi.json for the API.",
                code="not_found",
            )
        check_access(route, self.config, request)
        handler = route.methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(route.methods))
            raise ApiError(
                405, f"{request.method} is not allowed on {request.path}; use {allowed}.",
                code="method_not_allowed",
            )
        await handler(self._state, request, responder)
