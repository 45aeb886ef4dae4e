"""Disaggregated serving end to end with mocker workers: 2 prefill + 2 decode, and failures."""

from __future__ import annotations

import asyncio
import json
import random
import re
import urllib.request

import pytest

from kvflow.cli.top_view import render_text

# Tiny test model: ~1 token per 3-letter word; long enough prompts to take the remote path.
ALWAYS = ("--disagg-mode", "always")


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        return resp.read().decode()


def frontend_metric(url: str, name: str) -> float:
    text = metrics_text(url)
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE))


def debug_route(url: str, text: str) -> dict:
    """POST /debug/route: both pools' decisions, the plan, recent time splits."""
    body = json.dumps({"model": "m", "prompt": text}).encode()
    req = urllib.request.Request(url + "/debug/route", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def fleet_snapshot(url: str) -> dict:
    with urllib.request.urlopen(url + "/fleet/snapshot", timeout=5) as resp:
        return json.loads(resp.read())


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(["ab", "cd", "ef", "gh", "ij"]) * 2 for _ in range(words))


async def wait_prefill_pool(chaos, url: str, timeout: float = 30.0) -> None:
    """Until the frontend routes remotely (a first request counted as a remote decision)."""
    async with chaos.client() as client:
        for _ in range(int(timeout / 0.2)):
            await client.completions.create(model="m", prompt=prompt(random.Random(0), 40),
                                            max_tokens=2)
            if frontend_metric(url, "kvflow_disagg_prefill_decisions_total") > 0:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError("the frontend never saw the prefill pool")


async def test_2p2d_serves_200_concurrent_requests_exactly(chaos) -> None:
    url = chaos.frontend(*ALWAYS)
    prefill = [chaos.worker("--role", "prefill", speedup=20.0) for _ in range(2)]
    decode = [chaos.worker("--role", "decode", speedup=20.0) for _ in range(2)]
    await chaos.wait_workers(2)
    await wait_prefill_pool(chaos, url)
    rng = random.Random(7)
    jobs = [(prompt(rng, rng.randint(20, 120)), rng.randint(1, 40)) for _ in range(200)]
    async with chaos.client(timeout=120) as client:
        outs = await asyncio.gather(*(client.completions.create(
            model="m", prompt=p, max_tokens=n, extra_body={"ignore_eos": True}) for p, n in jobs))
    assert [o.usage.completion_tokens for o in outs] == [n for _, n in jobs]
    assert all(w.generate_requests() > 0 for w in prefill + decode)  # every worker took work
    pulled = sum(w.metric("kv_transfer_blocks_total", family="kvflow_") for w in decode)
    assert pulled > 200  # blocks really moved to the decode workers
    assert frontend_metric(url, "kvflow_kv_transfer_bytes_total") > 0
    assert frontend_metric(url, "kvflow_kv_transfer_failures_total") == 0
    debug = debug_route(url, jobs[0][0])
    assert debug["plan"]["remote"] and set(debug) >= {"decode", "prefill", "recent"}
    split = debug["recent"][-1]
    assert split["kv_bytes"] > 0 and split["prefill_s"] > 0 and split["backend"] == "shm"
    # /fleet shows both pools by role and the transfers between them; so does `kvflow top`
    snap = fleet_snapshot(url)
    roles = {w["id"]: w["role"] for w in snap["workers"]}
    assert sorted(roles.values()) == ["decode", "decode", "prefill", "prefill"]
    moved = snap["transfers"]
    assert 0 < len(moved) <= 20 and all(t["model"] == "m" for t in moved)
    assert all(roles[t["prefill_worker"]] == "prefill" and roles[t["decode_worker"]] == "decode"
               and t["bytes"] > 0 and t["backend"] == "shm" for t in moved)
    text = render_text(snap)
    assert "KV transfers" in text and f"{moved[0]['prefill_worker']} -> " in text


async def test_kill_9_prefill_worker_mid_transfer_recomputes_on_decode(chaos) -> None:
    url = chaos.frontend(*ALWAYS)
    prefill = chaos.worker("--role", "prefill", speedup=20.0)
    # 300 prompt tokens of an 8B model's KV (128 KiB each) at 20 MB/s: ~2 s on the wire.
    decode = chaos.worker("--role", "decode", "--kv-transfer-bandwidth", "2e7", speedup=1.0)
    await chaos.wait_workers(1)
    await _until(lambda: "has prefill workers" in chaos.procs[0].output(), 30)
    async with chaos.client(timeout=60) as client:
        request = asyncio.ensure_future(client.completions.create(
            model="m", prompt=prompt(random.Random(1), 300), max_tokens=8,
            extra_body={"ignore_eos": True}))
        await _until(lambda: decode.generate_requests() > 0, 20)  # prefill done, pull started
        prefill.proc.kill()  # SIGKILL mid-transfer: its KV, agent and connection vanish
        out = await request
    assert out.usage.completion_tokens == 8  # recomputed on the decode worker, no error
    assert decode.metric("kv_transfer_failures_total", family="kvflow_") == 1
    assert decode.metric("kv_transfer_blocks_total", family="kvflow_") == 0
    assert frontend_metric(url, "kvflow_kv_transfer_bytes_total") == 0


@pytest.mark.slow
async def test_kill_9_prefill_worker_mid_prefill_prefills_elsewhere(chaos) -> None:
    chaos.frontend(*ALWAYS)
    slow = chaos.worker("--role", "prefill", speedup=0.05)  # a prefill of many seconds
    fast = chaos.worker("--role", "prefill", speedup=20.0)
    chaos.worker("--role", "decode", speedup=20.0)
    await chaos.wait_workers(1)
    await _until(lambda: slow.registered() and fast.registered(), 30)
    await asyncio.sleep(0.5)  # the frontend's prefill router sees both
    async with chaos.client(timeout=60) as client:
        rng = random.Random(3)
        requests = [asyncio.ensure_future(client.completions.create(
            model="m", prompt=prompt(rng, 300), max_tokens=8, extra_body={"ignore_eos": True}))
            for _ in range(4)]
        await _until(lambda: slow.generate_requests() > 0, 20)
        slow.proc.kill()
        outs = await asyncio.gather(*requests)
    assert [o.usage.completion_tokens for o in outs] == [8] * 4


async def test_decode_worker_killed_after_transfer_migrates(chaos) -> None:
    chaos.frontend(*ALWAYS)
    chaos.worker("--role", "prefill", speedup=20.0)
    decode = [chaos.worker("--role", "decode", speedup=1.0) for _ in range(2)]
    await chaos.wait_workers(2)
    await _until(lambda: "has prefill workers" in chaos.procs[0].output(), 30)
    async with chaos.client(timeout=60) as client:
        stream = await client.completions.create(
            model="m", prompt=prompt(random.Random(2), 80), max_tokens=120, stream=True,
            temperature=0, extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
        chunks, killed, usage = 0, [], 0
        async for chunk in stream:
            chunks += bool(chunk.choices)
            if chunks == 20 and not killed:
                busy = [w for w in decode if w.metric("running_requests") > 0]
                assert len(busy) == 1
                assert busy[0].metric("kv_transfer_blocks_total", family="kvflow_") > 0
                busy[0].proc.kill()
                killed.append(busy[0])
            if chunk.usage:
                usage = chunk.usage.completion_tokens
    assert killed and usage == 120


async def _until(check, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _until_registered(worker) -> None:
    await _until(worker.registered, 30)




async def test_mismatched_block_size_is_refused_at_registration(chaos) -> None:
    chaos.frontend(*ALWAYS)
    chaos.worker("--role", "decode", "--block-size", "16")
    await chaos.wait_workers(1)
    prefill = chaos.worker("--role", "prefill", "--block-size", "8")
    frontend = chaos.procs[0]
    # The worker itself refuses to join (register_llm checks the model's registered workers);
    # a worker that registers anyway is refused by the frontend's layout check.
    await _until(lambda: not prefill.proc.alive() or "refusing prefill worker" in frontend.output(), 30)
    if prefill.proc.alive():
        line = next(x for x in frontend.output().splitlines() if "refusing prefill worker" in x)
        assert "block_size: new 8 vs pool's 16" in line
    else:
        assert "already served with KV block size 16" in prefill.proc.output()
        assert "this worker's block size is 8" in prefill.proc.output()
    assert "has prefill workers" not in frontend.output()  # requests stay aggregated
    async with chaos.client() as client:
        out = await client.completions.create(model="m", prompt=prompt(random.Random(4), 60),
                                              max_tokens=3, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3


async def test_prefill_timeout_falls_back_to_local_prefill(chaos) -> None:
    url = chaos.frontend(*ALWAYS, "--disagg-prefill-timeout-s", "1")
    chaos.worker("--role", "prefill", speedup=0.01)  # a 300-token prefill takes many seconds
    chaos.worker("--role", "decode", speedup=20.0)
    await chaos.wait_workers(1)
    await _until(lambda: "has prefill workers" in chaos.procs[0].output(), 30)
    async with chaos.client(timeout=60) as client:
        out = await client.completions.create(model="m", prompt=prompt(random.Random(6), 300),
                                              max_tokens=4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    assert re.search(r'kvflow_disagg_prefill_decisions_total\{[^}]*reason="prefill_failed"[^}]*\} 1',
                     metrics_text(url))
