"""A real planner run: frontend, `kvflow planner --connector local --apply`, mocker workers, rising then
falling load. Workers are added, then drained away, and no request fails."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
import uuid
from pathlib import Path

import openai

from kvflow.cli.top_view import render_text
from kvflow.engines.mocker.timing import TimingModel, load_profile
from kvflow.planner.perf import PerfModel
from kvflow.testing.procs import kvflow_proc, live_workers, runtime_env
from kvflow.testing.tokenizer import make_model_dir


def _fleet(url: str) -> dict:
    with urllib.request.urlopen(url + "/fleet/snapshot", timeout=5) as resp:
        return json.loads(resp.read())


def _live_workers(url: str) -> int:
    try:
        return live_workers(url, "m", timeout=2)
    except OSError:  # the frontend is not up yet
        return 0


async def _load(client: openai.AsyncOpenAI, rate: float, seconds: float, failures: list) -> int:
    sent: list[asyncio.Task] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent.append(asyncio.ensure_future(
            client.completions.create(model="m", prompt=f"request {len(sent)} about planning",
                                      max_tokens=10)))
        await asyncio.sleep(1 / rate)
    for result in await asyncio.gather(*sent, return_exceptions=True):
        if isinstance(result, BaseException) or result.usage.completion_tokens != 10:
            failures.append(result)
    return len(sent)


async def test_planner_adds_then_drains_workers_and_no_request_fails(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "tiny")
    profile = tmp_path / "slow.json"  # ~0.1 s per step: a worker keeps up with ~2.5 req/s
    profile.write_text(json.dumps({"step_overhead_s": 0.1}))
    perf = tmp_path / "perf.json"
    perf.write_text(PerfModel.from_timing(TimingModel(load_profile(profile))).to_json())
    env = runtime_env(discovery="file", discovery_path=tmp_path / "discovery", lease_ttl=1.0,
                      namespace="plan" + uuid.uuid4().hex[:6], file_poll_interval=0.05)
    logs = tmp_path / "logs"
    frontend = kvflow_proc("frontend", "--http-port", "0", env=env, log_dir=logs, name="frontend")
    frontend.wait_for_output("frontend: listening on", timeout=60)
    url = re.search(r"listening on (http://\S+)", frontend.output()).group(1)  # type: ignore[union-attr]
    decisions = tmp_path / "decisions.jsonl"
    worker_args = (f"--engine mocker --model-path {model} --model-name m --speedup-ratio 1 "
                   f"--mocker-profile {profile}")
    planner = kvflow_proc(
        "planner", "--frontend-urls", url, "--model", "m", "--connector", "local", "--apply",
        "--worker-args", worker_args, "--worker-log-dir", str(logs), "--perf-model", str(perf),
        "--interval-s", "1", "--ttft-p90-s", "1.5", "--itl-p90-s", "0.15", "--headroom", "0",
        "--min-workers", "1", "--max-workers", "4", "--scale-down-intervals", "2",
        "--cooldown-s", "2", "--predictor", "constant", "--decisions-file", str(decisions),
        env=env, log_dir=logs, name="planner")
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        deadline = time.monotonic() + 60
        while _live_workers(url) < 1:
            assert time.monotonic() < deadline, planner.output()
            await asyncio.sleep(0.2)
        failures: list = []
        await _load(client, 1.0, 3, failures)
        busy = await _load(client, 8.0, 6, failures)
        peak = _live_workers(url)
        await _load(client, 0.5, 5, failures)
        deadline = time.monotonic() + 30
        while _live_workers(url) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        actions = [json.loads(line)["action"] for line in decisions.read_text().splitlines()]
        assert not failures, failures[:3]
        assert busy >= 40
        assert "scale_up" in actions and peak >= 2, (actions, peak)
        assert "scale_down" in actions and _live_workers(url) == 1, (actions, planner.output()[-3000:])
        # each decision also reached the frontend over the event plane, for /fleet and top
        snap = _fleet(url)
        (latest,) = snap["planner"]["decisions"]
        assert latest["model"] == "m" and latest["applied"] and latest["action"] in actions
        assert "Planner (latest decision per model)" in render_text(snap)
    finally:
        await client.close()
        planner.stop()
        frontend.stop()
    assert planner.popen.returncode == 0  # SIGTERM: the planner drains its workers and exits cleanly
