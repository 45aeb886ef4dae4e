"""A real Prometheus scrapes a real stack: every dashboard panel's PromQL returns plausible series."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "kvflow-dashboard.json"
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="needs Debian's prometheus binary (scripts/dev.sh test installs it)")
# Metrics this test's traffic cannot move off zero, and the tests that do.
ELSEWHERE = {
    "kvflow_frontend_migrations_total": "tests/chaos/conftest.py",  # test_migration.py
    "kvflow_router_rejected_requests_total": "tests/router/test_admission.py",
    "kvflow_router_waiting_requests": "tests/router/test_admission.py",
    "kvflow_endpoint_errors_total": "tests/observe/test_metrics.py",
    "kvflow_frontend_canary_failures_total": "tests/chaos/test_canary.py",
    "kvflow_frontend_stalls_total": "tests/chaos/test_stalls.py",
    "kvflow_frontend_stall_migrations_total": "tests/chaos/test_stalls.py",
    "kvflow_frontend_closed_connections_total": "tests/chaos/test_slow_clients.py",
    "kvflow_worker_missing_kv_events": "tests/engines/test_plugins.py",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of the dashboard, at a 1m rate window."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"].replace("$__rate_interval", "1m"))
            for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


class Prometheus:
    def __init__(self, tmp: Path, targets: dict[str, str]) -> None:
        self.port = _free_port()
        jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{t}']\n"
                       for job, t in targets.items())
        config = tmp / "prometheus.yml"
        config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n{jobs}")
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=self.log)

    def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = _get(url)
        assert body["status"] == "success", body
        return body["data"]["result"]

    async def wait_ready(self) -> None:
        for _ in range(300):
            try:
                if self.query("up"):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError("prometheus did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


async def _traffic(base: str, seconds: float = 3.0) -> None:
    """Two streams at a time for a few seconds (the engine runs one, queues one: every gauge
    moves while Prometheus scrapes), with a shared prefix (router hits) and distinct tails
    (GPU evictions reach the host tier); then a burst over the in-flight limit (429s)."""
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    shared = "You are a careful assistant for the fleet dashboard test. " * 4
    deadline = asyncio.get_running_loop().time() + seconds

    async def loop(lane: int) -> None:
        i = 0
        while asyncio.get_running_loop().time() < deadline:
            i += 1
            await client.completions.create(model="m", prompt=shared + f"question {lane} {i} " * 3,
                                            max_tokens=24)

    await asyncio.gather(loop(0), loop(1))
    burst = [client.chat.completions.create(model="m", max_tokens=16,
                                            messages=[{"role": "user", "content": f"burst {i}"}])
             for i in range(6)]
    results = await asyncio.gather(*burst, return_exceptions=True)
    assert any(isinstance(r, openai.RateLimitError) for r in results), results  # 429s happened
    await client.close()


async def _until_all(prom: Prometheus, queries: list[tuple[str, str]], timeout_s: float = 40) -> dict:
    results: dict = {}
    for _ in range(int(timeout_s / 0.5)):
        results = {q: prom.query(q) for _, q in queries}
        if all(results.values()):
            return results
        await asyncio.sleep(0.5)
    empty = [title + ": " + q for title, q in queries if not results.get(q)]
    raise AssertionError("panels with no series:\n" + "\n".join(empty))


async def test_dashboard_panels_have_series_in_a_real_prometheus(stack, model_dir, tmp_path) -> None:
    base = stack.frontend("--max-inflight-per-model", "2", "--max-queued-per-model", "0")
    system_port = _free_port()
    stack.mocker(model_dir, "--system-port", str(system_port), "--speedup-ratio", "1", "--max-num-seqs", "1",
                 "--block-size", "4", "--num-gpu-blocks", "64", "--num-host-blocks", "400")
    await stack.wait_workers(base, "m", 1)
    prom = Prometheus(tmp_path, {"kvflow-frontend": base.removeprefix("http://"),
                                 "kvflow-worker": f"127.0.0.1:{system_port}"})
    try:
        await prom.wait_ready()
        await asyncio.sleep(1.5)  # a scrape before the traffic: rates start from a baseline
        await _traffic(base)
        results = await _until_all(prom, panel_queries())
        for promql, series in results.items():
            for s in series:
                value = float(s["value"][1])
                assert math.isfinite(value) and value >= 0, (promql, s)
        hit = prom.query("sum(rate(kvflow_router_predicted_hit_ratio_sum[1m])) / "
                         "sum(rate(kvflow_router_predicted_hit_ratio_count[1m]))")
        assert 0 < float(hit[0]["value"][1]) <= 1
        _check_every_metric_seen(prom)
    finally:
        prom.stop()


def _check_every_metric_seen(prom: Prometheus, timeout_s: float = 15) -> None:
    """Every documented metric has a non-zero sample at some scrape (or a test elsewhere)."""
    import runpy
    import time

    catalog = runpy.run_path(str(ROOT / "scripts" / "metrics_doc.py"))["catalog"]()
    for doc in catalog:
        if doc.name in ELSEWHERE:
            assert doc.name in (ROOT / ELSEWHERE[doc.name]).read_text(), doc.name
    names = {d.name: d.name + ("_count" if d.type == "histogram" else "")
             for d in catalog if d.name not in ELSEWHERE}
    deadline = time.monotonic() + timeout_s  # the last traffic may not be scraped yet
    while True:
        never = [n for n, q in names.items() if not prom.query(f"max_over_time({q}[5m]) > 0")]
        if not never or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert never == [], f"metrics never seen non-zero: {never}"
