"""DistributedRuntime: one per process; owns discovery, the planes and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from kvflow.runtime import codec
from kvflow.runtime.component import Endpoint, Instance, Namespace, parse_endpoint_path
from kvflow.runtime.config import RuntimeConfig
from kvflow.runtime.context import Context
from kvflow.runtime.discovery import Discovery, make_discovery
from kvflow.runtime.errors import needs_extra
from kvflow.runtime.events import EventPlane, ScopedEvents, make_event_plane
from kvflow.runtime.request_plane.metrics import EndpointMetrics
from kvflow.runtime.request_plane.tcp_client import ConnectionPool
from kvflow.runtime.request_plane.tcp_server import TcpServer

log = logging.getLogger(__name__)


class DistributedRuntime:
    """Discovery + request plane + event plane for one process.

    Lifecycle: `await start()` → serve / call endpoints → `await shutdown()`.
    Graceful shutdown removes this process's instances from discovery first, lets
    in-flight streams finish (refusing new ones), then closes everything.
    """

    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig.from_env()
        self.discovery: Discovery = make_discovery(self.config)
        self.event_plane: EventPlane = make_event_plane(self.config, self.discovery)
        self.events = ScopedEvents(self.event_plane, self.config.namespace)
        self.metrics_registry = CollectorRegistry()
        self._endpoint_metrics: EndpointMetrics | None = None
        self._server: TcpServer | None = None
        self._server_lock = asyncio.Lock()
        self._nats_requests: Any = None  # NatsRequestPlane, made on first use (request_plane="nats")
        self.connection_pool = ConnectionPool(self.config.max_frame_bytes, self._client_ssl())
        self.shutdown_event = asyncio.Event()
        self._closed = asyncio.Event()
        self._instance_keys: list[str] = []
        self._serving = 0
        self._drained = asyncio.Event()
        self._started = False
        self._system_server: Any = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> DistributedRuntime:
        if self._started:
            return self
        self._started = True
        await self.discovery.start()
        await self.event_plane.start()
        if self.config.system_port is not None:
            from kvflow.runtime.system_server import SystemServer

            self._system_server = SystemServer(self, self.config.system_host, self.config.system_port)
            await self._system_server.start()
        return self

    async def __aenter__(self) -> DistributedRuntime:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def lease_id(self) -> int:
        return self.discovery.lease_id

    @property
    def serving(self) -> bool:
        """Whether any endpoint is served (then a shutdown drains it before closing)."""
        return self._serving > 0

    def new_instance_id(self) -> int:
        return random.getrandbits(63) or 1

    def initiate_shutdown(self) -> None:
        """Begin graceful shutdown (safe to call from a signal handler)."""
        if not self.shutdown_event.is_set():
            log.info("runtime: graceful shutdown requested")
            asyncio.ensure_future(self.shutdown())

    async def shutdown(self) -> None:
        if self.shutdown_event.is_set():
            await self._closed.wait()
            return
        keys, self._instance_keys = self._instance_keys, []
        for key in keys:  # deregister first: no new traffic arrives
            with contextlib.suppress(Exception):
                await self.discovery.delete(key)
        self.shutdown_event.set()
        if self._serving:  # serve() calls drain their streams, then the last one sets this
            await self._drained.wait()
        await self._close_all()
        self._closed.set()

    async def _close_all(self) -> None:
        if self._system_server is not None:
            await self._system_server.close()
        if self._server is not None:
            await self._server.close()
        if self._nats_requests is not None:
            await self._nats_requests.close()
        await self.connection_pool.close()
        await self.event_plane.close()
        await self.discovery.close(revoke=True)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- naming -------------------------------------------------------------------------
    def namespace(self, name: str) -> Namespace:
        return Namespace(self, name)

    def endpoint(self, path: str) -> Endpoint:
        ns, comp, ep = parse_endpoint_path(path)
        return self.namespace(ns).component(comp).endpoint(ep)

    # -- serving ------------------------------------------------------------------------
    @property
    def endpoint_metrics(self) -> EndpointMetrics:
        if self._endpoint_metrics is None:
            self._endpoint_metrics = EndpointMetrics(self.metrics_registry)
        return self._endpoint_metrics

    async def tcp_server(self) -> TcpServer:
        async with self._server_lock:
            if self._server is None:
                host = self.config.bind_host or self.config.advertise_host
                server = TcpServer(
                    host,
                    self.config.tcp_port,
                    max_frame=self.config.max_frame_bytes,
                    metrics=self.endpoint_metrics,
                    ssl_context=self._server_ssl(),
                )
                await server.start()
                self._server = server
            return self._server

    async def serve_endpoint(
        self,
        endpoint: Endpoint,
        handler: Callable[[Any, Context], AsyncIterator[Any]],
        *,
        graceful_shutdown: bool,
        metadata: dict,
        instance_id: int | None,
        request_type: Any,
    ) -> None:
        if self.shutdown_event.is_set():
            raise RuntimeError("runtime is shutting down; cannot serve new endpoints")
        server = await self.tcp_server()
        iid = instance_id or self.lease_id
        served = server.register(endpoint.path, iid, handler, request_type)
        transport = self.config.request_plane  # "nats": also listen on NATS; callers use NATS
        inst = Instance(
            iid,
            endpoint.namespace,
            endpoint.component.name,
            endpoint.name,
            self.config.advertise_host,
            server.port,
            transport,
            metadata,
        )
        key = f"{endpoint.discovery_prefix}{iid:016x}"
        self._serving += 1
        try:
            if transport == "nats":
                await (await self.nats_request_plane()).serve(served)
            await self.discovery.put(key, codec.encode(inst), lease=True)
            self._instance_keys.append(key)
            await self.shutdown_event.wait()
            if graceful_shutdown:
                await server.drain(served, self.config.graceful_shutdown_timeout)
        finally:
            server.unregister(served)
            if self._nats_requests is not None:
                await self._nats_requests.unserve(served)
            self._serving -= 1
            if not self._serving:
                self._drained.set()

    async def nats_request_plane(self) -> Any:
        """The NATS request plane (kvflow.runtime.request_plane.nats), connected on first use."""
        async with self._server_lock:
            if self._nats_requests is None:
                with needs_extra("the NATS request plane (--request-plane nats)", "nats"):
                    from kvflow.runtime.request_plane.nats import NatsRequestPlane

                plane = NatsRequestPlane(self.config.nats_url, metrics=self.endpoint_metrics)
                self._nats_requests = await plane.start()
            return self._nats_requests

    # -- TLS ----------------------------------------------------------------------------
    def _server_ssl(self) -> ssl.SSLContext | None:
        if not self.config.request_plane_tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.config.request_plane_tls_cert, self.config.request_plane_tls_key or None)
        return ctx

    def _client_ssl(self) -> ssl.SSLContext | None:
        if not self.config.request_plane_tls_cert and not self.config.request_plane_tls_ca:
            return None
        ctx = ssl.create_default_context(
            cafile=self.config.request_plane_tls_ca or self.config.request_plane_tls_cert
        )
        ctx.check_hostname = False
        return ctx
