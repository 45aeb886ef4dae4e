"""Discovery outage: with etcd down, requests to known workers keep succeeding; then it returns."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from kvflow.testing.servers import ETCD_BINARY, EtcdServer, binary_available

pytestmark = pytest.mark.skipif(not binary_available(ETCD_BINARY), reason="etcd not installed")


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def etcd_stack(etcd: EtcdServer, make_stack):  # etcd outlives the processes
    return make_stack(discovery="etcd", etcd_endpoints=etcd.endpoints)


async def _requests_during(client, seconds: float) -> int:
    """Send completions back to back for `seconds`; every one must succeed."""
    deadline, done = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        out = await client.completions.create(model="m", prompt="still there?", max_tokens=8)
        assert out.usage.completion_tokens == 8
        done += 1
    return done


async def _outage(etcd_stack, etcd: EtcdServer, seconds: float) -> None:
    etcd_stack.frontend()
    etcd_stack.worker(speedup=0)
    await etcd_stack.wait_workers(1)
    async with etcd_stack.client() as client:
        etcd.stop()
        served = await _requests_during(client, seconds)
        assert served > 0 and etcd_stack.live_workers() == 1  # nobody forgot the worker
        etcd.start()
        late = etcd_stack.worker(speedup=0)  # registrations resume
        await etcd_stack.wait_workers(2, timeout=30)
        while late.generate_requests() == 0:
            await _requests_during(client, 0.2)
        await asyncio.sleep(2.5)  # past the lease TTL: the first worker's lease was kept alive
        assert etcd_stack.live_workers() == 2
        await _requests_during(client, 0.5)


async def test_requests_survive_a_short_etcd_outage(etcd_stack, etcd) -> None:
    await _outage(etcd_stack, etcd, seconds=3.0)


@pytest.mark.slow
async def test_requests_survive_a_30s_etcd_outage(etcd_stack, etcd) -> None:
    await _outage(etcd_stack, etcd, seconds=30.0)
