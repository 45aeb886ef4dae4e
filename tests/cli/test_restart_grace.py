"""While a model's workers restart, clients get 503 + Retry-After (not 404) and /health says so."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

from kvflow.testing.procs import kvflow_proc


def _post(base: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read() or b"{}")


def _health(base: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def _until(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(check)
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


def _worker(stack, model_dir):
    return stack.start("worker", "--engine", "echo", "--model-path", str(model_dir), "--model-name", "m",
                       name="worker")


async def test_restarting_worker_gets_503_then_serves_again(stack, model_dir) -> None:
    base = stack.frontend("--model-grace-period", "60")
    body = {"model": "m", "prompt": "hello", "max_tokens": 2}
    worker = _worker(stack, model_dir)
    await _until(lambda: _post(base, body)[0] == 200)
    worker.kill()
    # Once discovery drops the dead worker (lease TTL 1 s), the model is "restarting".
    status, health = await _until(lambda: (h := _health(base))[1].get("restarting") and h)
    assert status == 503 and health["status"] == "restarting" and "m" in health["restarting"]
    code, headers, err = await asyncio.to_thread(_post, base, body)
    assert code == 503 and int(headers["retry-after"]) >= 1
    assert "restarting" in err["error"]["message"]
    _worker(stack, model_dir)
    await _until(lambda: _post(base, body)[0] == 200)
    assert _health(base)[1]["status"] == "ready"


async def test_model_is_dropped_after_the_grace_period(stack, model_dir) -> None:
    base = stack.frontend("--model-grace-period", "1")
    body = {"model": "m", "prompt": "hello", "max_tokens": 2}
    worker = _worker(stack, model_dir)
    await _until(lambda: _post(base, body)[0] == 200)
    worker.kill()
    seen = []
    await _until(lambda: seen.append(_post(base, body)[0]) or seen[-1] == 404)
    assert set(seen) <= {200, 503, 404}


async def test_dead_worker_within_its_lease_is_not_live(stack, model_dir) -> None:
    base = stack.frontend("--model-grace-period", "60")
    body = {"model": "m", "prompt": "hello", "max_tokens": 2}
    # A long lease: discovery keeps the dead worker for 30 s after the kill.
    worker = kvflow_proc("worker", "--engine", "echo", "--model-path", str(model_dir), "--model-name", "m",
                         env={**stack.env, "KVFLOW_LEASE_TTL": "30"}, log_dir=stack.log_dir, name="worker")
    stack.procs.append(worker)
    await _until(lambda: _post(base, body)[0] == 200)
    worker.kill()
    code, headers, _ = await asyncio.to_thread(_post, base, body)  # finds the worker gone
    assert code == 503 and int(headers["retry-after"]) >= 1
    status, health = await asyncio.to_thread(_health, base)
    assert status == 503 and health["models"] == {"m": 0}
