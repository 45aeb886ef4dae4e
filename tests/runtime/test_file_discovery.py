"""File discovery: key/value, prefix watches, leases that expire with their owner."""

from __future__ import annotations

import asyncio

from kvflow.runtime.discovery.base import DELETE, PUT
from kvflow.runtime.discovery.file import FileDiscovery


async def _next(watch, timeout: float = 3.0):
    return await asyncio.wait_for(watch.__anext__(), timeout)


async def test_put_get_prefix_delete(tmp_path) -> None:
    d = FileDiscovery(tmp_path, lease_ttl=2.0, poll_interval=0.02)
    await d.start()
    await d.put("a/x", b"1")
    await d.put("a/y", b"2", lease=False)
    await d.put("b/z", b"3")
    assert await d.get("a/x") == b"1"
    assert await d.get_prefix("a/") == {"a/x": b"1", "a/y": b"2"}
    await d.delete("a/x")
    assert await d.get("a/x") is None
    await d.close()
    other = FileDiscovery(tmp_path, lease_ttl=2.0)
    await other.start()
    assert await other.get_prefix("") == {"a/y": b"2"}  # leased keys revoked, plain key kept
    await other.close()


async def test_watch_snapshot_then_events(tmp_path) -> None:
    writer = FileDiscovery(tmp_path, lease_ttl=2.0, poll_interval=0.02)
    reader = FileDiscovery(tmp_path, lease_ttl=2.0, poll_interval=0.02)
    await writer.start()
    await reader.start()
    await writer.put("svc/1", b"one")
    watch = reader.watch_prefix("svc/")
    first = await _next(watch)
    assert (first.kind, first.key, first.value) == (PUT, "svc/1", b"one")
    await writer.put("svc/2", b"two")
    await writer.put("other/3", b"x")
    ev = await _next(watch)
    assert (ev.kind, ev.key) == (PUT, "svc/2")
    await writer.delete("svc/1")
    ev = await _next(watch)
    assert (ev.kind, ev.key) == (DELETE, "svc/1")
    watch.close()
    await writer.close()
    await reader.close()


async def test_dead_owner_expires_within_ttl(tmp_path) -> None:
    owner = FileDiscovery(tmp_path, lease_ttl=0.5, poll_interval=0.02)
    watcher = FileDiscovery(tmp_path, lease_ttl=0.5, poll_interval=0.02)
    await owner.start()
    await watcher.start()
    await owner.put("inst/1", b"alive")
    watch = watcher.watch_prefix("inst/")
    assert (await _next(watch)).kind == PUT
    await owner.close(revoke=False)  # like kill -9: keep-alive stops, files stay
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ev = await _next(watch, timeout=3.0)
    assert ev.kind == DELETE and loop.time() - t0 < 0.5 + 0.3
    assert await watcher.get("inst/1") is None
    await watcher.close()


async def test_keepalive_keeps_key(tmp_path) -> None:
    owner = FileDiscovery(tmp_path, lease_ttl=0.3, poll_interval=0.02)
    await owner.start()
    await owner.put("k", b"v")
    await asyncio.sleep(1.0)  # three TTLs
    reader = FileDiscovery(tmp_path, lease_ttl=0.3)
    await reader.start()
    assert await reader.get("k") == b"v"
    await reader.close()
    await owner.close()
