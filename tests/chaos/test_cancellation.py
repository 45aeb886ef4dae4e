"""Cancellation end to end: a client that hangs up frees its request's KV blocks on the worker."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from urllib.parse import urlsplit


async def _open_stream(url: str, max_tokens: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """POST a streaming completion on a raw socket and read until the first SSE chunk."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    body = json.dumps({"model": "m", "prompt": "tell me a very long story " * 8,
                       "max_tokens": max_tokens, "stream": True}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%b" % (len(body), body))
    await writer.drain()
    while b"data:" not in await reader.readline():
        pass
    return reader, writer


async def _wait_until(check, timeout: float) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"not done within {timeout}s")
        await asyncio.sleep(0.002)
    return time.perf_counter() - start


async def test_disconnect_aborts_and_frees_kv_blocks(chaos) -> None:
    chaos.frontend()
    worker = chaos.worker(speedup=1.0)
    await chaos.wait_workers(1)
    latencies = []
    for _ in range(3):
        reader, writer = await _open_stream(chaos.url, max_tokens=1500)
        await _wait_until(lambda: worker.metric("kv_active_blocks") > 0, 5)
        assert worker.metric("running_requests") == 1
        start = time.perf_counter()
        writer.transport.abort()  # the client hangs up mid-stream
        await _wait_until(lambda: worker.metric("kv_active_blocks") == 0, 5)
        latencies.append(time.perf_counter() - start)
        assert worker.metric("running_requests") == 0
    # The abort itself is one step of the engine (~6 ms here); polling /metrics adds a few
    # ms more. On a loaded CI machine allow slack, but the median must stay within 100 ms.
    print("cancel-to-free latencies (s):", [round(x, 4) for x in latencies])
    assert statistics.median(latencies) < 0.1, latencies
