"""The infrastructure host's services restart: serving goes on, discovery and KV events recover."""

from __future__ import annotations

import asyncio

PREFIX = "an infrastructure restart should not lose the router's view of blocks, part "


async def _cached_after_repeat(rig, prompt: str) -> int:
    """Send `prompt` twice; the router must know its blocks in between (KV events arrived).

    Returns the cached prompt tokens the engine reported for the second request.
    """
    first = await rig.client(lambda client: rig.stream(client, prompt, 6))
    assert first[1:3] == ("length", 6)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while await asyncio.to_thread(rig.route_overlap, prompt) == 0:  # worker → NATS → router
        assert loop.time() < deadline, "the router never learned the prompt's blocks"
        await asyncio.sleep(0.2)
    second = await rig.client(lambda client: rig.stream(client, prompt + " again", 6))
    assert second[1:3] == ("length", 6)
    return second[3]


async def test_etcd_restart_keeps_serving_and_workers_stay_registered(rig) -> None:
    rig.frontend()
    rig.worker("w1")
    rig.worker("w2")
    await rig.wait_workers(2)
    rig.etcd.stop()
    assert await _cached_after_repeat(rig, PREFIX * 4 + "one") > 0  # served while etcd is down
    rig.etcd.start()
    await asyncio.sleep(rig.c.lease_ttl * 2)  # leases re-granted, keys re-put
    await rig.wait_workers(2, timeout=30)
    # A worker that joins after the restart is found too.
    rig.worker("w1")
    await rig.wait_workers(3, timeout=40)
    assert await _cached_after_repeat(rig, PREFIX * 4 + "two") > 0


async def test_nats_restart_keeps_serving_and_kv_events_resume(rig) -> None:
    rig.frontend()
    rig.worker("w1")
    rig.worker("w2")
    await rig.wait_workers(2)
    assert await _cached_after_repeat(rig, PREFIX * 4 + "before") > 0
    rig.nats.stop()
    await asyncio.sleep(0.5)
    rig.nats.start()
    await asyncio.sleep(3.0)  # nats-py reconnects (its reconnect wait is short in kvflow)
    assert await _cached_after_repeat(rig, PREFIX * 4 + "after") > 0
