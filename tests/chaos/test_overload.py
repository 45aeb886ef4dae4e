"""Overload end to end: a 10x burst gets 200s and 429s with Retry-After, never anything else."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

from kvflow.frontend.testing import RawResponse, raw_request

LIMIT, QUEUE = 4, 4
BURST = 10 * (LIMIT + QUEUE)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _complete(url: str, max_tokens: int) -> tuple[RawResponse, float]:
    start = time.perf_counter()
    body = json.dumps({"model": "m", "prompt": "overload me", "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    parts = urlsplit(url)
    resp = await raw_request(parts.hostname or "", parts.port or 0, "POST", "/v1/completions",
                             body, {"content-type": "application/json"})
    return resp, time.perf_counter() - start


async def _get(url: str, path: str) -> str:
    parts = urlsplit(url)
    return (await raw_request(parts.hostname or "", parts.port or 0, "GET", path)).body.decode()


async def test_burst_beyond_the_limit_gets_429_with_retry_after(chaos) -> None:
    chaos.frontend("--max-inflight-per-model", str(LIMIT), "--max-queued-per-model", str(QUEUE),
                   "--queue-timeout", "20", "--overload-retry-after", "2")
    chaos.worker(speedup=1.0)
    await chaos.wait_workers(1)
    frontend, url = chaos.procs[0], chaos.url
    _, calm = await _complete(url, 30)
    rss_before = _rss_mb(frontend.pid)
    for _ in range(2):  # two bursts: memory must not grow with each one
        results = await asyncio.gather(*(_complete(url, 30) for _ in range(BURST)))
        ok = [(r, t) for r, t in results if r.status == 200]
        refused = [r for r, _ in results if r.status == 429]
        assert len(ok) + len(refused) == BURST, {r.status for r, _ in results}
        assert len(ok) >= LIMIT + QUEUE and refused
        assert all(r.json()["usage"]["completion_tokens"] == 30 for r, _ in ok)
        for r in refused:
            assert r.headers["retry-after"] == "2"
            assert r.json()["error"]["type"] == "rate_limit_error"
        # Admitted requests waited at most behind one full set of slots.
        assert max(t for _, t in ok) < 4 * calm * (1 + QUEUE / LIMIT) + 1.0
    assert _rss_mb(frontend.pid) - rss_before < 40
    metrics = await _get(url, "/metrics")
    assert 'kvflow_frontend_rejected_requests_total{model="m",reason="queue_full"}' in metrics


async def test_router_overload_is_503_with_retry_after(chaos) -> None:
    chaos.frontend("--router-max-active-requests", "1", "--router-max-queue", "0",
                   "--router-retry-after-s", "3")
    chaos.worker(speedup=1.0)
    await chaos.wait_workers(1)
    first = asyncio.ensure_future(_complete(chaos.url, 100))
    await asyncio.sleep(0.2)  # the first holds the only worker's only slot
    second, _ = await _complete(chaos.url, 5)
    assert second.status == 503
    assert second.headers["retry-after"] == "3"
    assert second.json()["error"]["code"] == "overloaded"
    done, _ = await first
    assert done.status == 200
