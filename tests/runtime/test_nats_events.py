"""NATS event plane against a real nats-server: wildcards, unsubscribe, server restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from kvflow.runtime.events.base import Subscription
from kvflow.runtime.events.nats import NatsEventPlane, NatsUnavailableError
from kvflow.testing.servers import NatsServer, free_port


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture
async def planes(nats_server: NatsServer) -> AsyncIterator[tuple[NatsEventPlane, NatsEventPlane]]:
    pub, sub = NatsEventPlane(nats_server.url), NatsEventPlane(nats_server.url)
    await pub.start()
    await sub.start()
    yield pub, sub
    await pub.close()
    await sub.close()


async def drain(sub: Subscription, quiet: float = 0.2) -> list[bytes]:
    """Every payload that arrives until `quiet` seconds pass without one."""
    got = []
    while True:
        try:
            got.append(await asyncio.wait_for(sub.__anext__(), quiet))
        except asyncio.TimeoutError:
            return got


async def test_wildcards_match_like_nats(planes: tuple[NatsEventPlane, NatsEventPlane]) -> None:
    pub, plane = planes
    one = plane.subscribe("ns.kv.*")
    tail = plane.subscribe("ns.>")
    exact = plane.subscribe("ns.load.w1")
    await plane.ready()
    for subject in ("ns.kv.w1", "ns.kv.w1.extra", "ns.load.w1", "other.kv.w1", "ns"):
        await pub.publish(subject, subject.encode())  # the payload names its subject
    assert await drain(one) == [b"ns.kv.w1"]
    assert one.last_subject == "ns.kv.w1"
    assert await drain(tail) == [b"ns.kv.w1", b"ns.kv.w1.extra", b"ns.load.w1"]
    assert await drain(exact) == [b"ns.load.w1"]


async def test_closed_subscription_stops_receiving(planes: tuple[NatsEventPlane, NatsEventPlane]) -> None:
    pub, plane = planes
    kept, dropped = plane.subscribe("x.a"), plane.subscribe("x.a")
    await plane.ready()
    dropped.close()
    await plane.ready()
    await pub.publish("x.a", b"1")
    assert await drain(kept) == [b"1"]
    assert [item async for item in dropped] == []  # closed: iteration ends, nothing delivered


async def test_publisher_hears_its_own_subscription_without_waiting(nats_server: NatsServer) -> None:
    plane = NatsEventPlane(nats_server.url)
    await plane.start()
    sub = plane.subscribe("self.>")
    await plane.publish("self.ping", b"p")  # publish waits for our own pending subscriptions
    assert await asyncio.wait_for(sub.__anext__(), 2) == b"p"
    await plane.close()


async def test_subscribers_receive_again_after_server_restart() -> None:
    with NatsServer() as server:
        pub, plane = NatsEventPlane(server.url), NatsEventPlane(server.url)
        await pub.start()
        await plane.start()
        sub = plane.subscribe("kv.*")
        await plane.ready()
        await pub.publish("kv.before", b"0")
        assert await asyncio.wait_for(sub.__anext__(), 2) == b"0"

        await asyncio.to_thread(server.kill)
        await pub.publish("kv.during", b"lost or late")  # buffered or dropped, never an exception
        await asyncio.to_thread(server.start)
        t0 = time.monotonic()
        while True:
            await pub.publish("kv.after", b"1")
            try:
                payload = await asyncio.wait_for(sub.__anext__(), 0.2)
            except asyncio.TimeoutError:
                assert time.monotonic() - t0 < 5, "subscriber did not receive within 5s of the restart"
                continue
            if payload == b"1":
                break
        await pub.close()
        await plane.close()


async def test_unreachable_server_fails_start_with_clear_error() -> None:
    plane = NatsEventPlane(f"nats://127.0.0.1:{free_port()}", connect_timeout=0.5)
    with pytest.raises(NatsUnavailableError, match="nats-url"):
        await plane.start()
    await plane.close()
