"""etcd discovery: leased keys kept alive in the background, prefix watches that survive restarts.

Why aetcd: it is an asyncio-native client for etcd's v3 gRPC API (built on grpc.aio), so
keep-alives and watches run on kvflow's own event loop with no helper threads, and it ships
the generated stubs we would otherwise vendor. python-etcd3 is thread-based and unmaintained;
aioetcd3 and etcd3-py are abandoned. aetcd does not re-establish leases or watches after etcd
goes away, so this module owns that:

* Lease: one per process. Its id is chosen here (random) and requested from etcd, so it is
  known before `start()` and stays `lease_id` for the process's lifetime. A keep-alive loop
  refreshes it every TTL/3. When a refresh fails (etcd down, restarted with an empty data dir,
  or the lease expired) the loop reconnects with backoff (rotating through the endpoints),
  re-grants the lease (same id when etcd allows it) and re-puts every key this process put
  with `lease=True`. Recovery takes at most ~TTL/4 after etcd answers again.
* Watch: lists the prefix (snapshot → PUT events), then watches from the next revision. When
  the stream breaks it waits for the session, re-lists, emits the difference as PUT/DELETE
  events and watches again, so a watcher never misses the net effect of an outage.
* Calls (put/get/...) wait up to `op_timeout` for a live session, then raise DiscoveryError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import exceptions as etcd_errors
from aetcd.utils import prefix_range_end

from kvflow.runtime.discovery.base import DELETE, PUT, Discovery, Watch, WatchEvent
from kvflow.runtime.errors import DiscoveryError, ServiceUnreachableError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "the connection is bad": reconnect and retry. Other ClientErrors are answers.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError, etcd_errors.WatchTimeoutError,
    grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.TimeoutError, OSError)
RETRY_MIN_S = 0.05
CLOSE_WAIT_S = 2.0  # how long close() waits for its background tasks to end
WATCH_RETRY_S = 0.05


@dataclass(frozen=True)
class EtcdEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoints(endpoints: str) -> list[EtcdEndpoint]:
    """'http://a:2379,b:2379' → [EtcdEndpoint('a', 2379), EtcdEndpoint('b', 2379)]."""
    out = []
    for raw in (e.strip() for e in endpoints.split(",")):
        if not raw:
            continue
        url = urlsplit(raw if "://" in raw else f"http://{raw}")
        if url.scheme != "http":
            raise ValueError(f"etcd endpoint {raw!r}: only http:// endpoints are supported (no TLS yet)")
        if not url.hostname:
            raise ValueError(f"etcd endpoint {raw!r} has no host; expected e.g. http://127.0.0.1:2379")
        out.append(EtcdEndpoint(url.hostname, url.port or 2379))
    if not out:
        raise ValueError("etcd_endpoints is empty; expected e.g. http://127.0.0.1:2379")
    return out


def key_range(prefix: str) -> tuple[bytes, bytes]:
    """[start, end) covering every key that starts with `prefix` ('' = all keys)."""
    if not prefix:
        return b"\0", b"\0"
    start = prefix.encode()
    return start, prefix_range_end(start)


def diff_views(old: dict[str, bytes], new: dict[str, bytes]) -> list[WatchEvent]:
    """Events that turn `old` into `new`: deletions first, then puts, each sorted by key."""
    events = [WatchEvent(DELETE, k) for k in sorted(old.keys() - new.keys())]
    events += [WatchEvent(PUT, k, v) for k, v in sorted(new.items()) if old.get(k) != v]
    return events


class EtcdDiscovery(Discovery):
    name = "etcd"

    def __init__(self, endpoints: str, lease_ttl: float = 10.0, *, op_timeout: float = 5.0) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.ttl = max(1, math.ceil(lease_ttl))  # etcd TTLs are whole seconds
        self.op_timeout = op_timeout
        self.keepalive_timeout = max(0.25, self.ttl / 3)
        self.max_backoff = min(1.0, self.ttl / 4)
        self._lease = random.getrandbits(62) or 1
        self._current_lease = 0  # the lease etcd holds now (== _lease unless etcd refused that id)
        self._owned: dict[str, bytes] = {}
        self._client: aetcd.Client | None = None  # replaced (never mutated) on reconnect
        self._endpoint_index = 0
        self._up = asyncio.Event()
        self._broken = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._watch_tasks: dict[Watch, asyncio.Task] = {}
        self._retired: set[aetcd.Client] = set()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        errors = []
        for _ in self.endpoints:
            try:
                await asyncio.wait_for(self._open_session(), self.op_timeout)
                await asyncio.wait_for(self._restore_lease(), self.op_timeout)
                break
            except (*CONNECTION_ERRORS, etcd_errors.ClientError) as exc:
                errors.append(f"{self._endpoint()}: {exc or type(exc).__name__}")
                await self._drop_session()
                self._endpoint_index += 1
        else:
            raise ServiceUnreachableError(
                f"cannot reach etcd ({'; '.join(errors)}); start etcd or point --etcd-endpoints "
                f"(KVFLOW_ETCD_ENDPOINTS) at a running cluster")
        self._up.set()
        self._spawn(self._keepalive_loop())

    async def close(self, revoke: bool = True) -> None:
        self._closed = True
        for watch in list(self._watch_tasks):
            watch.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a loop that missed its cancel ends at its next _closed check
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
            if pending:
                log.warning("etcd: %d discovery task(s) still running %ss after close",
                            len(pending), CLOSE_WAIT_S)
        if revoke and self._client is not None and self._current_lease:
            try:
                await asyncio.wait_for(self._client.revoke_lease(self._current_lease), 2.0)
            except (*CONNECTION_ERRORS, etcd_errors.ClientError) as exc:
                log.warning("etcd: could not revoke lease %x (%s); its keys expire in %ss",
                            self._current_lease, exc, self.ttl)
        self._owned.clear()
        await self._drop_session()
        for client in list(self._retired):
            await self._close_client(client)

    @property
    def lease_id(self) -> int:
        return self._lease

    # -- key/value ---------------------------------------------------------------------
    async def put(self, key: str, value: bytes, *, lease: bool = True) -> None:
        if lease:
            self._owned[key] = value
        else:
            self._owned.pop(key, None)
        await self._call(f"put {key!r}", lambda c: c.put(
            key.encode(), value, lease=self._current_lease if lease else None))

    async def get(self, key: str) -> bytes | None:
        got = await self._call(f"get {key!r}", lambda c: c.get(key.encode()))
        return None if got is None else got.value

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        start, end = key_range(prefix)
        rng = await self._call(f"list {prefix!r}", lambda c: c.get_range(start, end))
        return {kv.key.decode(): kv.value for kv in rng.kvs}

    async def delete(self, key: str) -> None:
        self._owned.pop(key, None)
        await self._call(f"delete {key!r}", lambda c: c.delete(key.encode()))

    def watch_prefix(self, prefix: str) -> Watch:
        watch = Watch(prefix, on_close=self._forget_watch)
        self._watch_tasks[watch] = self._spawn(self._watch_loop(watch))
        return watch

    def _forget_watch(self, watch: Watch) -> None:
        task = self._watch_tasks.pop(watch, None)
        if task is not None:
            task.cancel()

    # -- sessions ----------------------------------------------------------------------
    def _endpoint(self) -> EtcdEndpoint:
        return self.endpoints[self._endpoint_index % len(self.endpoints)]

    async def _open_session(self) -> None:
        """Connect a fresh client on a fresh gRPC channel (which reconnects at once, no backoff)."""
        ep = self._endpoint()
        client = aetcd.Client(host=ep.host, port=ep.port, timeout=self.op_timeout,
                              options=self._grpc_options())
        await client.connect()
        self._client = client

    def _grpc_options(self) -> dict[str, int]:
        """A private subchannel pool with short reconnect backoff: gRPC otherwise shares one
        connection (and its backoff of up to minutes) between all channels to a target."""
        backoff_ms = int(self.max_backoff * 1000)
        return {"grpc.use_local_subchannel_pool": 1, "grpc.initial_reconnect_backoff_ms": 50,
                "grpc.min_reconnect_backoff_ms": 50, "grpc.max_reconnect_backoff_ms": backoff_ms}

    async def _drop_session(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._close_client(client)

    def _retire_session(self) -> None:
        """Stop using the current client; close it after in-flight calls had time to fail."""
        client, self._client = self._client, None
        if client is not None:
            self._retired.add(client)
            self._spawn(self._close_later(client))

    async def _close_later(self, client: aetcd.Client) -> None:
        await asyncio.sleep(self.op_timeout)
        await self._close_client(client)

    async def _close_client(self, client: aetcd.Client) -> None:
        self._retired.discard(client)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 2.0)

    def _report_broken(self, client: aetcd.Client | None) -> None:
        """A call on `client` hit a connection error: wake the keep-alive loop to reconnect."""
        if client is not None and self._client is client:
            self._up.clear()
            self._broken.set()

    async def _wait_session(self, deadline: float | None, what: str) -> aetcd.Client:
        loop = asyncio.get_running_loop()
        while self._client is None or not self._up.is_set():
            if self._closed:
                raise DiscoveryError(f"etcd discovery is closed; cannot {what}")
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait_for(self._up.wait(), timeout)
            except asyncio.TimeoutError:
                raise DiscoveryError(
                    f"etcd at {self._endpoint()} unreachable for {self.op_timeout}s; cannot {what}. "
                    f"Is etcd running? Check --etcd-endpoints (KVFLOW_ETCD_ENDPOINTS)") from None
        return self._client

    async def _call(self, what: str, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run `op` on a live client, reconnecting and retrying until `op_timeout` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout
        while True:
            client = await self._wait_session(deadline, what)
            try:
                return await asyncio.wait_for(op(client), max(0.01, deadline - loop.time()))
            except CONNECTION_ERRORS as exc:
                self._report_broken(client)
                if loop.time() >= deadline:
                    raise DiscoveryError(f"etcd: cannot {what}: {exc or type(exc).__name__}") from exc
                await asyncio.sleep(RETRY_MIN_S)
            except etcd_errors.ClientError as exc:
                raise DiscoveryError(f"etcd refused to {what}: {exc}") from exc

    # -- lease ---------------------------------------------------------------------------
    async def _keepalive_loop(self) -> None:
        """Every TTL/3: refresh the lease; on any failure, recover (reconnect, re-grant, re-put).
        The loops here also stop on `_closed`, not only on a cancel: Python 3.11's wait_for
        can drop a cancel that arrives as its wait ends, and the loop would run on forever."""
        while not self._closed:
            broken = await self._wait_broken(self.ttl / 3)
            if self._closed:  # (close() may have run while it waited)
                return
            if broken or not await self._refresh():
                await self._recover()

    async def _wait_broken(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._broken.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _refresh(self) -> bool:
        assert self._client is not None
        try:
            reply = await asyncio.wait_for(
                self._client.refresh_lease(self._current_lease), self.keepalive_timeout)
        except (*CONNECTION_ERRORS, etcd_errors.ClientError) as exc:
            log.debug("etcd: keep-alive failed: %s", exc or type(exc).__name__)
            self._retire_session()
            return False
        if reply is None or reply.TTL <= 0:
            log.warning("etcd: lease %x is gone; re-granting it and re-putting %d keys",
                        self._current_lease, len(self._owned))
            return False
        return True

    async def _recover(self) -> None:
        log.warning("etcd: re-establishing the session with %s", self._endpoint())
        self._up.clear()
        delay = RETRY_MIN_S
        while not self._closed:
            try:
                if self._client is None:
                    await asyncio.wait_for(self._open_session(), self.op_timeout)
                if self._closed:  # a session opened while close() ran: close() never sees it
                    await self._drop_session()
                    return
                await asyncio.wait_for(self._restore_lease(), self.op_timeout)
                break
            except (*CONNECTION_ERRORS, etcd_errors.ClientError) as exc:
                log.debug("etcd: reconnect to %s failed: %s", self._endpoint(), exc)
                self._retire_session()
                self._endpoint_index += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        if self._closed:
            return
        log.info("etcd: session to %s restored (lease %x)", self._endpoint(), self._current_lease)
        self._broken.clear()
        self._up.set()

    async def _restore_lease(self) -> None:
        """Keep the lease if etcd still has it; else grant it again and re-put every owned key."""
        client = self._client
        assert client is not None
        if self._current_lease:
            reply = await client.refresh_lease(self._current_lease)
            if reply is not None and reply.TTL > 0:
                return
        await self._grant(client)
        for key, value in list(self._owned.items()):
            await client.put(key.encode(), value, lease=self._current_lease)

    async def _grant(self, client: aetcd.Client) -> None:
        try:
            lease = await client.lease(self.ttl, self._lease)
        except etcd_errors.DuplicateLeaseError:  # another process holds our id: take any
            lease = await client.lease(self.ttl)
        self._current_lease = lease.id

    # -- watches -----------------------------------------------------------------------
    async def _watch_loop(self, watch: Watch) -> None:
        """List (emit the difference), then stream events; on any break, do it again."""
        view: dict[str, bytes] = {}
        while not self._closed:
            try:
                client = await self._wait_session(None, f"watch {watch.prefix!r}")
            except DiscoveryError:
                return  # closed
            try:
                revision = await self._relist(client, watch, view)
                await self._stream(client, watch, view, revision)
            except etcd_errors.RevisionCompactedError:
                pass  # fell behind the compaction: re-list
            except CONNECTION_ERRORS:
                self._report_broken(client)
            except etcd_errors.ClientError as exc:
                log.warning("etcd: watch on %r failed: %s; retrying", watch.prefix, exc)
            await asyncio.sleep(WATCH_RETRY_S)

    async def _relist(self, client: aetcd.Client, watch: Watch, view: dict[str, bytes]) -> int:
        start, end = key_range(watch.prefix)
        rng = await asyncio.wait_for(client.get_range(start, end), self.op_timeout)
        new = {kv.key.decode(): kv.value for kv in rng.kvs}
        for event in diff_views(view, new):
            watch.push(event)
        view.clear()
        view.update(new)
        return rng.header.revision

    async def _stream(self, client: aetcd.Client, watch: Watch, view: dict[str, bytes],
                      revision: int) -> None:
        start, end = key_range(watch.prefix)
        stream = await asyncio.wait_for(
            client.watch(start, range_end=end, start_revision=revision + 1), self.op_timeout)
        try:
            async for event in stream:
                key = event.kv.key.decode()
                if event.kind == aetcd.EventKind.PUT:
                    view[key] = event.kv.value
                    watch.push(WatchEvent(PUT, key, event.kv.value))
                else:
                    view.pop(key, None)
                    watch.push(WatchEvent(DELETE, key))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.cancel(), 1.0)

    # -- tasks ---------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("etcd discovery task failed", exc_info=task.exception())
