"""etcd discovery against a real etcd: key/value, watches, lease expiry, etcd restarts."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from kvflow.runtime import DistributedRuntime, RuntimeConfig
from kvflow.runtime.discovery.base import DELETE, PUT, Watch, WatchEvent
from kvflow.runtime.discovery.etcd import EtcdDiscovery, diff_views, parse_endpoints
from kvflow.runtime.errors import DiscoveryError
from kvflow.testing.servers import EtcdServer, NatsServer, free_port

TTL = 1.0  # etcd rounds up to whole seconds; the test server's raft timers allow 1 s


@pytest.fixture
def prefix() -> str:
    return f"t/{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """A private etcd, for tests that stop or restart it."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
async def disco(etcd_server: EtcdServer) -> AsyncIterator[EtcdDiscovery]:
    d = EtcdDiscovery(etcd_server.endpoints, TTL)
    await d.start()
    yield d
    await d.close()


class View:
    """Applies a Watch's events to a dict, in the background."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.data: dict[str, bytes] = {}
        self.events: list[WatchEvent] = []
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for event in self.watch:
            self.events.append(event)
            if event.kind == PUT:
                self.data[event.key] = event.value
            else:
                self.data.pop(event.key, None)
            self._changed.set()

    async def until(self, predicate: object, timeout: float) -> float:
        """Seconds until predicate(data) holds; fails the test after `timeout`."""
        t0 = time.monotonic()
        while not predicate(self.data):  # type: ignore[operator]
            self._changed.clear()
            left = timeout - (time.monotonic() - t0)
            assert left > 0, f"watch view {self.data} did not reach the expected state in {timeout}s"
            await asyncio.wait_for(self._changed.wait(), left)
        return time.monotonic() - t0

    async def close(self) -> None:
        self.watch.close()
        await self._task


def test_parse_endpoints() -> None:
    eps = parse_endpoints("http://10.0.0.1:2379, 10.0.0.2:2380,")
    assert [(e.host, e.port) for e in eps] == [("10.0.0.1", 2379), ("10.0.0.2", 2380)]
    with pytest.raises(ValueError, match="only http://"):
        parse_endpoints("https://10.0.0.1:2379")
    with pytest.raises(ValueError, match="empty"):
        parse_endpoints(" , ")


def test_diff_views_orders_deletes_then_puts() -> None:
    events = diff_views({"a": b"1", "b": b"2", "c": b"3"}, {"b": b"2", "c": b"9", "d": b"4"})
    assert events == [WatchEvent(DELETE, "a"), WatchEvent(PUT, "c", b"9"), WatchEvent(PUT, "d", b"4")]


async def test_put_get_prefix_delete(disco: EtcdDiscovery, prefix: str) -> None:
    await disco.put(prefix + "a", b"1")
    await disco.put(prefix + "b", b"2", lease=False)
    await disco.put(prefix + "c/d", b"3")
    assert await disco.get(prefix + "a") == b"1"
    assert await disco.get(prefix + "missing") is None
    assert await disco.get_prefix(prefix) == {prefix + "a": b"1", prefix + "b": b"2", prefix + "c/d": b"3"}
    assert await disco.get_prefix(prefix + "c/") == {prefix + "c/d": b"3"}
    await disco.delete(prefix + "a")
    await disco.delete(prefix + "b")
    assert await disco.get_prefix(prefix) == {prefix + "c/d": b"3"}


async def test_watch_snapshot_then_puts_and_deletes(disco: EtcdDiscovery, prefix: str) -> None:
    await disco.put(prefix + "x", b"1")
    await disco.put(prefix + "y", b"2")
    await disco.put(prefix.rstrip("/") + "-other", b"not in the prefix")
    view = View(disco.watch_prefix(prefix))
    await view.until(lambda d: len(d) == 2, 5)
    assert view.events == [WatchEvent(PUT, prefix + "x", b"1"), WatchEvent(PUT, prefix + "y", b"2")]
    await disco.put(prefix + "z", b"3")
    await disco.put(prefix + "x", b"1b")
    await disco.delete(prefix + "y")
    await view.until(lambda d: d == {prefix + "x": b"1b", prefix + "z": b"3"}, 5)
    assert view.events[2:] == [WatchEvent(PUT, prefix + "z", b"3"), WatchEvent(PUT, prefix + "x", b"1b"),
                               WatchEvent(DELETE, prefix + "y")]
    await view.close()


async def test_close_revokes_or_leaves_keys_to_expire(etcd_server: EtcdServer, disco: EtcdDiscovery,
                                                      prefix: str) -> None:
    view = View(disco.watch_prefix(prefix))
    revoking = EtcdDiscovery(etcd_server.endpoints, TTL)
    dying = EtcdDiscovery(etcd_server.endpoints, TTL)
    await revoking.start()
    await dying.start()
    assert revoking.lease_id != dying.lease_id
    await revoking.put(prefix + "revoked", b"r")
    await dying.put(prefix + "expires", b"e")
    await view.until(lambda d: len(d) == 2, 5)
    await revoking.close(revoke=True)
    assert await view.until(lambda d: prefix + "revoked" not in d, 2) < TTL  # at once, not on expiry
    await dying.close(revoke=False)  # keep-alives stop, as if the process froze
    assert prefix + "expires" in view.data
    await view.until(lambda d: not d, 2 * TTL + 2)
    await view.close()


KILLED_CHILD = """
import asyncio, sys
from kvflow.runtime.discovery.etcd import EtcdDiscovery

async def main():
    d = EtcdDiscovery(sys.argv[1], float(sys.argv[3]))
    await d.start()
    await d.put(sys.argv[2], b"alive")
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_killed_process_key_vanishes_within_ttl(etcd_server: EtcdServer, disco: EtcdDiscovery,
                                                      prefix: str) -> None:
    key = prefix + "worker"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(KILLED_CHILD), etcd_server.endpoints, key, str(TTL),
        stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 30)  # type: ignore[union-attr]
        assert line.strip() == b"ready"
        view = View(disco.watch_prefix(prefix))
        await view.until(lambda d: key in d, 5)
        child.send_signal(signal.SIGKILL)
        gone_after = await view.until(lambda d: key not in d, 2 * TTL + 2)
        assert view.events[-1] == WatchEvent(DELETE, key)
        await view.close()
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert gone_after <= 2 * TTL + 1


@pytest.mark.parametrize("fresh", [False, True], ids=["same-data", "empty-data"])
async def test_etcd_restart_keeps_keys_and_watches(own_etcd: EtcdServer, prefix: str, fresh: bool) -> None:
    owner = EtcdDiscovery(own_etcd.endpoints, TTL, op_timeout=1.0)
    watcher = EtcdDiscovery(own_etcd.endpoints, TTL, op_timeout=1.0)
    await owner.start()
    await watcher.start()
    lease = owner.lease_id
    await owner.put(prefix + "instance", b"v1")
    view = View(watcher.watch_prefix(prefix))
    await view.until(lambda d: prefix + "instance" in d, 5)

    await asyncio.to_thread(own_etcd.kill)
    await asyncio.sleep(1.5 * TTL)  # longer than a keep-alive period: the lease is refreshed nowhere
    with pytest.raises(DiscoveryError, match="etcd"):
        await asyncio.wait_for(owner.get(prefix + "instance"), owner.op_timeout + 2)  # down: clear error
    await asyncio.to_thread(own_etcd.start, fresh)
    back = time.monotonic()
    while await _get_quietly(watcher, prefix + "instance") != b"v1":
        assert time.monotonic() - back < 2 * TTL, "leased key not back within 2x TTL of etcd's return"
        await asyncio.sleep(0.05)
    await view.until(lambda d: d.get(prefix + "instance") == b"v1", 2 * TTL)
    assert owner.lease_id == lease
    await owner.put(prefix + "after", b"v2")  # the session works normally again
    await view.until(lambda d: prefix + "after" in d, 5)
    await view.close()
    await owner.close()
    await watcher.close()


async def _get_quietly(d: EtcdDiscovery, key: str) -> bytes | None:
    try:
        return await d.get(key)
    except DiscoveryError:
        return None


async def test_lost_lease_is_regranted_and_keys_re_put(etcd_server: EtcdServer, disco: EtcdDiscovery,
                                                      prefix: str) -> None:
    owner = EtcdDiscovery(etcd_server.endpoints, TTL)
    await owner.start()
    await owner.put(prefix + "instance", b"v")
    view = View(disco.watch_prefix(prefix))
    await view.until(lambda d: d, 5)
    admin = EtcdDiscovery(etcd_server.endpoints, TTL)  # an operator revoking the lease by hand
    await admin.start()
    await admin._call("revoke", lambda c: c.revoke_lease(owner.lease_id))
    await admin.close()
    await view.until(lambda d: not d, 2)
    await view.until(lambda d: d.get(prefix + "instance") == b"v", 2 * TTL)
    await view.close()
    await owner.close()


@pytest.mark.parametrize("broken", [False, True])
async def test_close_ends_a_keepalive_that_missed_its_cancel(etcd_server: EtcdServer,
                                                             broken: bool) -> None:
    """Python 3.11's wait_for can drop a cancel that arrives as its wait ends (the keep-alive
    waits TTL/3 at a time). The loop must still end when discovery closes, without a refresh
    or a reconnect after it (`broken`: the wait returns as if the session had failed): once it
    ran on and a runtime's shutdown waited for it forever."""
    d = EtcdDiscovery(etcd_server.endpoints, TTL)
    real = d._wait_broken

    async def deaf(timeout: float) -> bool:  # what 3.11's wait_for does when the cancel races
        try:
            return await real(timeout)
        except asyncio.CancelledError:
            return broken

    d._wait_broken = deaf  # type: ignore[method-assign]
    await d.start()
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await asyncio.wait_for(d.close(), 10)
    assert time.monotonic() - t0 < 1.0  # not the bounded wait's 2 s: the loop itself ended
    assert not d._tasks


async def test_unreachable_etcd_fails_start_with_clear_error() -> None:
    d = EtcdDiscovery(f"http://127.0.0.1:{free_port()}", TTL, op_timeout=0.5)
    with pytest.raises(DiscoveryError, match="etcd-endpoints"):
        await d.start()
    await d.close()


async def test_runtime_serves_and_round_robins_over_etcd_and_nats(etcd_server: EtcdServer) -> None:
    with NatsServer() as nats:
        config = RuntimeConfig(namespace="t" + uuid.uuid4().hex[:8], discovery="etcd", lease_ttl=TTL,
                               etcd_endpoints=etcd_server.endpoints, event_plane="nats", nats_url=nats.url)
        workers = [await DistributedRuntime(config).start() for _ in range(2)]
        caller = await DistributedRuntime(config).start()

        serving = []
        for rt in workers:
            ep = rt.endpoint(f"{config.namespace}.worker.generate")

            async def handler(request: dict, ctx: object, iid: int = rt.lease_id) -> AsyncIterator[int]:
                for _ in range(request["n"]):
                    yield iid

            serving.append(asyncio.ensure_future(ep.serve(handler)))
        client = await caller.endpoint(f"{config.namespace}.worker.generate").client()
        ids = await client.wait_for_instances(timeout=10, count=2)
        assert sorted(ids) == sorted(rt.lease_id for rt in workers)
        got = []
        for _ in range(4):
            got.append([x async for x in client.round_robin({"n": 3})])
        assert all(len(set(g)) == 1 and len(g) == 3 for g in got)
        assert {g[0] for g in got} == set(ids)

        events = caller.events.subscribe("kv.*")
        await caller.event_plane.ready()  # type: ignore[attr-defined]
        await workers[0].events.publish("kv.w0", b"stored")
        assert await asyncio.wait_for(events.__anext__(), 5) == b"stored"

        await client.close()
        for rt in [*workers, caller]:
            await rt.shutdown()
        await asyncio.gather(*serving)
