"""Slow and idle clients against a real frontend: closed at their timeouts, while good
requests keep being served; beyond the connection limit a new client gets 503."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

LIMIT = 40
FLAGS = ("--http-keepalive-timeout", "2", "--http-header-timeout", "1",
         "--http-body-timeout", "1", "--max-connections", str(LIMIT))
BODY = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 2}).encode()
HEAD = (f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\n\r\n").encode()


def closed_metric(url: str, reason: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(rf'^kvflow_frontend_closed_connections_total\{{reason="{reason}"\}} (\S+)$',
                      text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def _open(url: str, send: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    if send:
        writer.write(send)
        await writer.drain()
    return reader, writer


async def _closed_after(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent before."""
    t0 = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 15)
    return time.monotonic() - t0, data


async def test_slow_clients_are_closed_and_the_limit_answers_503(chaos) -> None:
    chaos.frontend(*FLAGS)
    chaos.worker()
    await chaos.wait_workers(1)
    client = chaos.client(timeout=10)

    # At the limit, a new client gets a clear 503; nothing crashes.
    idle = [await _open(chaos.url, b"") for _ in range(LIMIT)]
    reader, writer = await _open(chaos.url, HEAD + BODY)
    status = (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n", 1)[0]
    assert status == b"HTTP/1.1 503 Service Unavailable"
    writer.close()
    for _, w in idle:
        w.close()
    await asyncio.sleep(0.3)

    # Slowloris: nothing, a partial header, a partial body (10 of each).
    slow = {"idle": b"", "header": HEAD[:30], "body": HEAD + BODY[:5]}
    conns = {kind: [await _open(chaos.url, data) for _ in range(10)] for kind, data in slow.items()}
    waits = {kind: [asyncio.ensure_future(_closed_after(r)) for r, _ in c]
             for kind, c in conns.items()}
    for i in range(5):  # meanwhile, well-formed requests are served
        out = await client.completions.create(model="m", prompt=f"hello {i}", max_tokens=3)
        assert out.choices[0].finish_reason == "length"
    limits = {"idle": 2.0, "header": 1.0, "body": 1.0}
    for kind, tasks in waits.items():
        for seconds, data in await asyncio.gather(*tasks):
            assert seconds < limits[kind] + 5, (kind, seconds)
            if kind == "idle":
                assert data == b""
            else:
                assert data.startswith(b"HTTP/1.1 408 "), data[:40]
        for _, w in conns[kind]:
            w.close()
    for kind in slow:
        assert closed_metric(chaos.url, kind) >= 10
    assert closed_metric(chaos.url, "limit") >= 1
    out = await client.completions.create(model="m", prompt="still here", max_tokens=3)
    assert out.choices[0].finish_reason == "length"
    await client.close()
