"""Cache salt with real processes: two salts never see each other's cached prefix; one
salt still hits its own cache, at the engine and in the router's view."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

PROMPT = " ".join(f"word{i % 17} and then some more" for i in range(40))


async def _cached(client, **kw) -> int:
    out = await client.completions.create(model="m", prompt=PROMPT, max_tokens=2, **kw)
    details = out.usage.prompt_tokens_details
    return details.cached_tokens if details else 0


def _overlap(url: str, salt: str | None, header: str | None = None) -> int:
    body = {"model": "m", "prompt": PROMPT} | ({"cache_salt": salt} if salt else {})
    headers = {"Content-Type": "application/json"} | ({"x-cache-salt": header} if header else {})
    req = urllib.request.Request(url + "/debug/route", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return max(json.loads(resp.read())["overlaps"].values(), default=0)


async def test_salts_never_share_cached_blocks(chaos) -> None:
    chaos.frontend()
    chaos.worker()
    await chaos.wait_workers(1)
    client = chaos.client(timeout=30)
    a = {"extra_body": {"cache_salt": "tenant-a"}}
    assert await _cached(client, **a) == 0
    assert await _cached(client, **a) > 0  # its own cache hits
    b = {"extra_body": {"cache_salt": "tenant-b"}}
    assert await _cached(client, **b) == 0  # not tenant-a's blocks
    header_a = {"extra_headers": {"x-cache-salt": "tenant-a"}}
    assert await _cached(client, **header_a) == 0  # a header salt is not a body salt
    assert await _cached(client) == 0  # nor is no salt
    assert await _cached(client, **b) > 0
    assert await _cached(client, **header_a) > 0
    # The router's index (fed by the worker's KV events) keeps them apart too.
    deadline = time.monotonic() + 10
    while _overlap(chaos.url, "tenant-a") == 0:
        assert time.monotonic() < deadline, "the router never saw tenant-a's blocks"
        await asyncio.sleep(0.05)
    assert _overlap(chaos.url, "tenant-c") == 0
    assert _overlap(chaos.url, None, header="tenant-c") == 0
    await client.close()
