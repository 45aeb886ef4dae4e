"""End to end: KV tiers behind a frontend — native workers sharing the object store, and the
workers' tier metrics on the frontend's /metrics.

Worker A computes a prompt and writes its blocks through to S3 (a real moto server);
A stops; worker B, a fresh process that never saw the prompt, serves it again with
its KV loaded from the object store: same greedy text, `cached_tokens_by_tier` says
"object", and B's /metrics count the onboarded blocks.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid

import openai
import pytest

from kvflow.kv.tiers.object_store import S3Store
from kvflow.testing.procs import kvflow_proc
from kvflow.testing.servers import MOTO_BINARY, S3Server, binary_available, free_port


async def _served(base: str, model: str, timeout: float = 60.0) -> None:
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused") as client:
        deadline = time.monotonic() + timeout
        while {m.id async for m in client.models.list()} != {model}:
            assert time.monotonic() < deadline, "the worker never registered"
            await asyncio.sleep(0.1)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def _metric(port: int, name: str, tier: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{tier="{tier}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.slow  # two native worker processes: ~1-2 min on a loaded 2-core box
@pytest.mark.skipif(not binary_available(MOTO_BINARY), reason="needs moto[server]")
async def test_worker_b_loads_what_worker_a_offloaded(stack, tmp_path, monkeypatch) -> None:
    pytest.importorskip("torch", reason="the native engine needs torch (kvflow[torch])")
    from kvflow.testing.models import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-llama", "llama")
    with S3Server() as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        url = f"s3://kv-{uuid.uuid4().hex[:10]}/fleet"
        S3Store(url, "x").ensure_bucket()
        base = stack.frontend()
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
        prompt = "the quick brown fox jumps over the lazy dog and keeps on running far away " * 3
        texts, usages = [], []
        for name in ("a", "b"):
            port = free_port()
            env = {**stack.env, **s3.env(), "KVFLOW_SYSTEM_PORT": str(port)}
            worker = kvflow_proc(
                "worker", "--engine", "native", "--model-path", str(model), "--model-name", "tiny",
                "--device", "cpu", "--block-size", "4", "--num-gpu-blocks", "64",
                "--kv-object-store", url, "--kv-offload", "write-through", "--kv-onboard", "always",
                env=env, log_dir=stack.log_dir, name=f"worker-{name}")
            stack.procs.append(worker)
            await _served(base, "tiny")
            out = await client.completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                                  temperature=0)
            texts.append(out.choices[0].text)
            usages.append(out.usage)
            if name == "a":
                for _ in range(100):  # the write-through finishes in the background
                    if _metric(port, "kvflow_kv_offload_blocks_total", "object") >= 30:
                        break
                    await asyncio.sleep(0.1)
                assert _metric(port, "kvflow_kv_offload_blocks_total", "object") >= 30
                worker.terminate()
                await asyncio.sleep(1.5)  # its registration lapses (lease TTL 1 s)
            else:
                assert _metric(port, "kvflow_kv_onboard_blocks_total", "object") > 0
                assert _metric(port, "kvflow_kv_onboard_seconds_count", "object") > 0
                assert _metric(port, "kvflow_kv_tier_hit_rate", "object") > 0
                for _ in range(50):  # and through the load metrics, on the frontend's /metrics
                    if 'kvflow_kv_onboard_blocks_total{' in _get(f"{base}/metrics"):
                        break
                    await asyncio.sleep(0.1)
                assert 'tier="object"' in _get(f"{base}/metrics")
        await client.close()
    assert texts[0] == texts[1]
    details = usages[1].prompt_tokens_details
    by_tier = details.model_extra["cached_tokens_by_tier"]
    assert by_tier["object"] >= usages[1].prompt_tokens - 8 and details.cached_tokens == by_tier["object"]


async def test_tier_metrics_reach_the_frontends_metrics(stack, model_dir) -> None:
    """`kvflow run out=mocker` with simulated host and disk tiers: a prefix evicted from the
    device comes back from a lower tier, and the frontend's /metrics shows the workers'
    offload / onboard counters per tier."""
    import re

    proc = stack.start("run", "in=http", "out=mocker", "--model-path", str(model_dir),
                       "--model-name", "m", "--http-port", "0", "--speedup-ratio", "0",
                       "--block-size", "4", "--num-gpu-blocks", "32", "--num-host-blocks", "64",
                       "--num-disk-blocks", "256")
    proc.wait_for_output("ready at", timeout=60)
    base = re.search(r"ready at (http://\S+)/v1", proc.output()).group(1)  # type: ignore[union-attr]
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    prompts = [[100 + 7 * i + j for j in range(100)] for i in range(3)]  # 25 blocks each
    for prompt in (prompts[0], prompts[1], prompts[2], prompts[0]):
        out = await client.completions.create(model="m", prompt=prompt, max_tokens=2)
    await client.close()
    details = out.usage.prompt_tokens_details
    assert details.model_extra["cached_tokens_by_tier"].get("host", 0) > 0
    want = re.compile(r'kvflow_kv_onboard_blocks_total\{[^}]*tier="host"[^}]*\} ([0-9.]+)')
    for _ in range(100):  # load metrics are published at most every 50 ms
        text = await asyncio.to_thread(_get, f"{base}/metrics")
        found = want.search(text)
        if found and float(found.group(1)) > 0:
            break
        await asyncio.sleep(0.1)
    assert found and float(found.group(1)) > 0, text[-2000:]
    assert re.search(r'kvflow_kv_offload_blocks_total\{[^}]*tier="host"[^}]*\} [1-9]', text)
