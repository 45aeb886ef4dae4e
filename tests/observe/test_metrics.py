"""Metric names and docs: docs/metrics.md matches the code, names follow the rule, errors count."""

from __future__ import annotations

import asyncio
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.runtime import DistributedRuntime, RuntimeConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "metrics_doc.py"


def test_metrics_page_is_generated_from_the_code() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_metric_follows_the_naming_rule() -> None:
    script = runpy.run_path(str(SCRIPT))
    docs = script["catalog"]()
    assert len(docs) >= 25 and script["naming_errors"](docs) == []
    bad = [d for d in docs if d.type == "counter" and not d.name.endswith("_total")]
    assert bad == []
    assert script["naming_errors"]([script["MetricDoc"]("kvflow_router_rejected", "gauge", (), "",
                                                        "", "")])  # the rule bites


async def _fail(request: dict, context):
    raise RuntimeError("boom")
    yield  # pragma: no cover


async def test_endpoint_errors_are_counted() -> None:
    rt = await DistributedRuntime(RuntimeConfig(discovery="memory", event_plane="inproc")).start()
    ep = rt.endpoint("obs.test.fail")
    task = asyncio.ensure_future(ep.serve(_fail))
    client = await ep.client()
    await client.wait_for_instances(timeout=5)
    with pytest.raises(Exception, match="boom"):
        _ = [x async for x in client.round_robin({})]
    value = rt.metrics_registry.get_sample_value("kvflow_endpoint_errors_total",
                                                 {"endpoint": "obs.test.fail"})
    assert value == 1
    await rt.shutdown()
    await task
