"""Serving across hosts: an openai client on its own host, a frontend host, two worker hosts."""

from __future__ import annotations

import asyncio

PROMPT = "a shared system prompt that is long enough to fill several KV blocks " * 4


async def test_streams_cross_hosts_and_kv_routing_reports_cached_tokens(rig) -> None:
    rig.frontend()
    rig.worker("w1")
    rig.worker("w2")
    await rig.wait_workers(2)

    async def two_turns(client):
        first = await rig.stream(client, PROMPT, 12)
        await asyncio.sleep(0.5)  # the worker's KV events cross NATS to the frontend's router
        second = await rig.stream(client, PROMPT + " and a follow-up", 12)
        return first, second

    first, second = await rig.client(two_turns)
    assert first[1:3] == ("length", 12) and second[1:3] == ("length", 12)
    assert first[3] == 0
    assert second[3] >= 40, f"the second request should reuse the first one's blocks: {second}"
