"""End to end: native worker processes share the object-store KV tier behind a frontend.

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

pytestmark = [pytest.mark.skipif(not binary_available(MOTO_BINARY), reason="needs moto[server]"),
              pytest.mark.slow]  # two native worker processes: ~1-2 min on a loaded 2-core box


async def _served(base: str, model: str, timeout: float = 60.0) -> None:
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused") as client:
        deadline = time.monotonic() + timeout
        while {m.id async for m in client.models.list()} != {model}:
            assert time.monotonic() < deadline, "the worker never registered"
            await asyncio.sleep(0.1)


def _metric(port: int, name: str, tier: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{tier="{tier}"}}'):
            return float(line.split()[-1])
    return 0.0


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
        await client.close()
    assert texts[0] == texts[1]
    details = usages[1].prompt_tokens_details
    by_tier = details.model_extra["cached_tokens_by_tier"]
    assert by_tier["object"] >= usages[1].prompt_tokens - 8 and details.cached_tokens == by_tier["object"]
