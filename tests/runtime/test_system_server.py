"""The per-process status port: /live, /health and per-endpoint Prometheus metrics."""

from __future__ import annotations

import asyncio
import urllib.request

from kvflow.runtime import DistributedRuntime, RuntimeConfig


async def _count(request: dict, context):
    for i in range(request["n"]):
        yield i


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def test_health_live_metrics() -> None:
    cfg = RuntimeConfig(discovery="memory", event_plane="inproc", system_port=0)
    rt = await DistributedRuntime(cfg).start()
    ep = rt.endpoint("sys.test.count")
    task = asyncio.ensure_future(ep.serve(_count))
    client = await ep.client()
    await client.wait_for_instances(timeout=5)
    assert [x async for x in client.round_robin({"n": 3})] == [0, 1, 2]
    base = f"http://127.0.0.1:{rt._system_server.port}"
    status, body = await asyncio.to_thread(_get, base + "/live")
    assert status == 200
    status, body = await asyncio.to_thread(_get, base + "/health")
    assert status == 200 and '"instances": 1' in body
    status, body = await asyncio.to_thread(_get, base + "/metrics")
    assert 'kvflow_endpoint_requests_total{endpoint="sys.test.count"} 1.0' in body
    assert 'kvflow_endpoint_responses_total{endpoint="sys.test.count"} 3.0' in body
    assert "kvflow_endpoint_request_duration_seconds_bucket" in body
    await rt.shutdown()
    await task
