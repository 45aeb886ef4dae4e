"""namespace → component → endpoint: how services are named, served and called."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from kvflow.runtime import codec
from kvflow.runtime.context import Context
from kvflow.runtime.discovery.base import PUT
from kvflow.runtime.errors import NoInstancesError, WorkerUnavailableError
from kvflow.runtime.events.base import ScopedEvents
from kvflow.runtime.request_plane.stream import ResponseStream
from kvflow.runtime.tasks import cancel_and_wait

if TYPE_CHECKING:
    from kvflow.runtime.runtime import DistributedRuntime

log = logging.getLogger(__name__)
INSTANCES_PREFIX = "v1/instances/"


class Instance(msgspec.Struct):
    """One serving instance of an endpoint, as registered in discovery."""

    instance_id: int
    namespace: str
    component: str
    endpoint: str
    host: str
    port: int
    transport: str = "tcp"
    metadata: dict = {}
    protocol_version: int = codec.PROTOCOL_VERSION

    @property
    def path(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}"


def parse_endpoint_path(path: str) -> tuple[str, str, str]:
    """'dyn://ns.comp.ep' or 'ns.comp.ep' → (ns, comp, ep)."""
    for scheme in ("dyn://", "kvflow://"):
        if path.startswith(scheme):
            path = path[len(scheme) :]
    parts = path.split(".")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"endpoint path must look like 'namespace.component.endpoint', got {path!r}")
    return parts[0], parts[1], parts[2]


class PingResult(NamedTuple):
    """A ping's outcome: whether the instance answered, and if not, what happened."""

    answered: bool
    detail: str = ""


class Namespace:
    def __init__(self, runtime: DistributedRuntime, name: str) -> None:
        self.runtime = runtime
        self.name = name
        self.events = ScopedEvents(runtime.event_plane, name)

    def component(self, name: str) -> Component:
        return Component(self, name)


class Component:
    def __init__(self, namespace: Namespace, name: str) -> None:
        self.namespace = namespace
        self.runtime = namespace.runtime
        self.name = name

    def endpoint(self, name: str) -> Endpoint:
        return Endpoint(self, name)


class Endpoint:
    def __init__(self, component: Component, name: str) -> None:
        self.component = component
        self.runtime = component.runtime
        self.name = name
        self.namespace = component.namespace.name
        self.path = f"{self.namespace}.{component.name}.{name}"

    @property
    def discovery_prefix(self) -> str:
        return f"{INSTANCES_PREFIX}{self.namespace}/{self.component.name}/{self.name}/"

    async def serve(
        self,
        handler: Callable[[Any, Context], AsyncIterator[Any]],
        graceful_shutdown: bool = True,
        metadata: dict | None = None,
        *,
        instance_id: int | None = None,
        request_type: Any = None,
    ) -> None:
        """Serve `handler` until the runtime shuts down (then drain and return)."""
        await self.runtime.serve_endpoint(
            self,
            handler,
            graceful_shutdown=graceful_shutdown,
            metadata=metadata or {},
            instance_id=instance_id,
            request_type=request_type,
        )

    async def client(self, response_type: Any = None) -> Client:
        client = Client(self, response_type)
        await client.start()
        return client


class Client:
    """Calls one endpoint's instances; follows them through discovery."""

    def __init__(self, endpoint: Endpoint, response_type: Any = None) -> None:
        self.endpoint = endpoint
        self.runtime = endpoint.runtime
        self.decoder = codec.decoder_for(response_type)
        self.instances: dict[int, Instance] = {}
        self._changed = asyncio.Event()
        self._rr = itertools.count()
        self._task: asyncio.Task | None = None
        self._down: dict[int, float] = {}
        self.on_change: list[Callable[[], None]] = []

    async def start(self) -> None:
        watch = self.runtime.discovery.watch_prefix(self.endpoint.discovery_prefix)
        self._task = asyncio.ensure_future(self._follow(watch))
        await asyncio.sleep(0)

    async def _follow(self, watch: Any) -> None:
        decode = msgspec.msgpack.Decoder(Instance).decode
        async for event in watch:
            iid = int(event.key.rsplit("/", 1)[1], 16)
            if event.kind == PUT:
                try:
                    self.instances[iid] = decode(event.value)
                except msgspec.DecodeError:
                    log.warning("ignoring undecodable instance record %s", event.key)
                    continue
                self._down.pop(iid, None)
            else:
                self.instances.pop(iid, None)
            self._changed.set()
            for cb in self.on_change:
                cb()

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    def instance_ids(self) -> list[int]:
        return sorted(self.instances)

    async def wait_for_instances(self, timeout: float | None = None, count: int = 1) -> list[int]:
        async def _wait() -> list[int]:
            while len(self.instances) < count:
                self._changed.clear()
                await self._changed.wait()
            return self.instance_ids()

        if timeout is None:
            return await _wait()
        try:
            return await asyncio.wait_for(_wait(), timeout)
        except asyncio.TimeoutError:
            raise NoInstancesError(
                f"no instance of {self.endpoint.path} appeared within {timeout}s"
            ) from None

    def live_instance_ids(self) -> list[int]:
        """Instances in discovery that have not just failed a connection (down for 2 s)."""
        now = asyncio.get_running_loop().time()
        return sorted(i for i in self.instances if self._down.get(i, 0.0) <= now)

    # -- routing -----------------------------------------------------------------------
    def _live(self) -> list[int]:
        now = asyncio.get_running_loop().time()
        ids = [i for i in self.instances if self._down.get(i, 0.0) <= now]
        if not ids:
            raise NoInstancesError(f"no live instances of {self.endpoint.path}")
        return sorted(ids)

    def round_robin(self, request: Any, context: Context | None = None) -> ResponseStream:
        return self._stream(request, context, lambda ids: ids[next(self._rr) % len(ids)])

    def random(self, request: Any, context: Context | None = None) -> ResponseStream:
        return self._stream(request, context, random.choice)

    def direct(self, request: Any, instance_id: int, context: Context | None = None) -> ResponseStream:
        return self._stream(request, context, None, instance_id)

    def _stream(
        self,
        request: Any,
        context: Context | None,
        pick: Callable[[list[int]], int] | None,
        instance_id: int | None = None,
    ) -> ResponseStream:
        body = msgspec.Raw(codec.encode(request))
        request_id = context.request_id if context is not None else ""
        tried: set[int] = set()

        async def opener(stream: ResponseStream, retry: bool) -> None:
            if retry and (pick is None or stream.instance_id is None):
                raise stream.error or WorkerUnavailableError("stream failed")
            if stream.instance_id is not None:
                tried.add(stream.instance_id)
                self._mark_down(stream.instance_id)
            while True:
                iid = self._choose(pick, instance_id, tried)
                try:
                    await self._open_on(stream, iid, body, request_id)
                    return
                except WorkerUnavailableError:
                    tried.add(iid)
                    self._mark_down(iid)
                    if pick is None:
                        raise

        return ResponseStream(self.decoder, opener, context, self.runtime.config.stream_timeout or None)

    def _choose(
        self, pick: Callable[[list[int]], int] | None, instance_id: int | None, tried: set[int]
    ) -> int:
        if pick is None:
            assert instance_id is not None
            if instance_id not in self.instances:
                raise NoInstancesError(f"instance {instance_id:x} of {self.endpoint.path} not found")
            return instance_id
        ids = [i for i in self._live() if i not in tried]
        if not ids:
            raise NoInstancesError(f"no reachable instance of {self.endpoint.path} (tried {len(tried)})")
        return pick(ids)

    async def ping(self, instance_id: int, timeout: float) -> PingResult:
        """Whether the instance answers a HELLO on the request plane within `timeout` s.

        A canary: it touches neither the handler nor the engine. NATS instances are not
        pinged (answered). Connecting counts against the same timeout.
        """
        inst = self.instances.get(instance_id)
        if inst is None:
            return PingResult(False, "it is not in discovery")
        if inst.transport == "nats":
            return PingResult(True)

        async def answer() -> None:
            pool = self.runtime.connection_pool
            conn = pool.get_nowait(inst.host, inst.port) or await pool.get(inst.host, inst.port)
            await conn.ping()

        try:
            await asyncio.wait_for(answer(), timeout)
        except asyncio.TimeoutError:
            return PingResult(False, f"no answer within {timeout:g}s")
        except (WorkerUnavailableError, OSError) as exc:
            return PingResult(False, str(exc))
        return PingResult(True)

    def _mark_down(self, iid: int, seconds: float = 2.0) -> None:
        self._down[iid] = asyncio.get_running_loop().time() + seconds

    async def _open_on(self, stream: ResponseStream, iid: int, body: msgspec.Raw, request_id: str) -> None:
        inst = self.instances[iid]
        conn: Any
        if inst.transport == "nats":
            conn = await self.runtime.nats_request_plane()
        else:
            pool = self.runtime.connection_pool
            conn = pool.get_nowait(inst.host, inst.port) or await pool.get(inst.host, inst.port)
        stream.attach(conn, iid, codec.RequestHeader(inst.path, iid, request_id, body))
