"""End to end: the official openai client against real frontend and worker processes."""

from __future__ import annotations

import asyncio
import re
import time

import openai
import pytest

from kvflow.testing.procs import Proc


def _ready_url(proc: Proc) -> str:
    proc.wait_for_output("ready at", timeout=60)
    return re.search(r"ready at (http://\S+)", proc.output()).group(1)  # type: ignore[union-attr]


async def _wait_models(base_url: str, want: set[str], timeout: float = 15.0) -> set[str]:
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused") as client:
        deadline = time.monotonic() + timeout
        while True:
            got = {m.id async for m in client.models.list()}
            if got == want or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.1)


async def test_kvflow_run_with_openai_client(stack, model_dir) -> None:
    proc = stack.start("run", "in=http", "out=echo", "--model-path", str(model_dir),
                       "--model-name", "tiny", "--http-port", "0")
    base = _ready_url(proc)
    client = openai.AsyncOpenAI(base_url=base, api_key="unused")
    chat = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello kvflow"}])
    # The echo engine answers a chat with its last message, without the template's role text.
    assert chat.choices[0].message.content == "hello kvflow"
    assert chat.usage.prompt_tokens > chat.usage.completion_tokens > 0
    pieces = []
    stream = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "stream me"}], stream=True,
        stream_options={"include_usage": True})
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "stream me" in "".join(pieces) and usage is not None
    comp = await client.completions.create(model="tiny", prompt="one two three", max_tokens=2)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="x")
    await client.close()


async def test_models_come_and_go_with_workers(stack, model_dir) -> None:
    base = stack.frontend("--model-grace-period", "0")
    a = stack.start("worker", "--engine", "echo", "--model-path", str(model_dir), "--model-name", "a")
    b = stack.start("worker", "--engine", "mocker", "--model-path", str(model_dir), "--model-name", "b",
                    "--speedup-ratio", "0")
    assert await _wait_models(base, {"a", "b"}) == {"a", "b"}
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    for model in ("a", "b"):
        out = await client.completions.create(model=model, prompt="side by side", max_tokens=4)
        assert out.choices[0].text and out.model == model
    b.kill()  # the last worker of model b dies: b is no longer listed
    assert await _wait_models(base, {"a"}) == {"a"}
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="b", prompt="x")
    stack.start("worker", "--engine", "echo", "--model-path", str(model_dir), "--model-name", "c")
    assert await _wait_models(base, {"a", "c"}) == {"a", "c"}
    assert a.alive()
    await client.close()


async def test_kv_routing_reports_cached_tokens(stack, model_dir) -> None:
    base = stack.frontend()
    stack.start("worker", "--engine", "mocker", "--model-path", str(model_dir), "--model-name", "m",
                "--num-workers", "4", "--speedup-ratio", "0", "--block-size", "4")
    assert await _wait_models(base, {"m"}) == {"m"}
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    prompt = "a shared system prompt that is long enough to fill several blocks " * 4
    first = await client.completions.create(model="m", prompt=prompt, max_tokens=3)
    await asyncio.sleep(0.3)  # KV events reach the router
    second = await client.completions.create(model="m", prompt=prompt + " and more", max_tokens=3)
    assert first.usage.prompt_tokens_details is None or first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 4, (cached, first.usage.prompt_tokens)
    await client.close()


async def test_native_engine_through_kvflow_run(stack, tmp_path) -> None:
    pytest.importorskip("torch", reason="the native engine needs torch (kvflow[torch])")
    from kvflow.testing.models import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-llama", "llama")
    proc = stack.start("run", "in=http", "out=native", "--model-path", str(model),
                       "--model-name", "native-tiny", "--http-port", "0", "--cpu-kv-cache-gb", "0.05")
    base = _ready_url(proc)
    client = openai.AsyncOpenAI(base_url=base, api_key="unused")
    outs = [await client.completions.create(model="native-tiny", prompt="hello world", max_tokens=8,
                                            temperature=0) for _ in range(2)]
    assert outs[0].usage.completion_tokens == 8
    assert outs[0].choices[0].text == outs[1].choices[0].text  # greedy is deterministic
    assert outs[1].usage.prompt_tokens_details.cached_tokens >= 0
    await client.close()


async def test_frontend_metrics_include_router_and_requests(stack, model_dir) -> None:
    import urllib.request

    base = stack.frontend()
    stack.start("worker", "--engine", "mocker", "--model-path", str(model_dir), "--model-name", "m",
                "--speedup-ratio", "0")
    assert await _wait_models(base, {"m"}) == {"m"}
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    await client.completions.create(model="m", prompt="count me", max_tokens=3)
    await client.close()
    want = 'kvflow_frontend_requests_total{endpoint="completions",model="m",status="success"} 1.0'
    for _ in range(50):  # the counter is bumped just after the response is written
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/metrics").read().decode())
        if want in body:
            break
        await asyncio.sleep(0.05)
    assert want in body
    assert "kvflow_frontend_output_sequence_tokens" in body
    assert "kvflow_router_" in body, "router metrics missing from the frontend's /metrics"


async def test_sixty_four_mocker_instances_in_one_process(stack, model_dir) -> None:
    base = stack.frontend()
    worker = stack.start("worker", "--engine", "mocker", "--model-path", str(model_dir),
                         "--model-name", "m64", "--num-workers", "64", "--speedup-ratio", "0")
    assert await _wait_models(base, {"m64"}, timeout=30) == {"m64"}
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    for _ in range(100):  # the pool fills as instances register
        if len(worker.output().split("instances=64")) > 1:
            break
        await asyncio.sleep(0.1)
    outs = await asyncio.gather(*(client.completions.create(
        model="m64", prompt=f"request number {i} " * 8, max_tokens=16) for i in range(128)))
    assert all(o.usage.completion_tokens == 16 for o in outs)
    await client.close()
    assert worker.alive()


async def test_run_out_dyn_serves_only_that_endpoint(stack, model_dir) -> None:
    workers = [stack.start("worker", "--engine", "echo", "--model-path", str(model_dir),
                           "--model-name", name, "--component", comp)
               for name, comp in (("here", "chosen"), ("there", "other"))]
    for worker in workers:
        worker.wait_for_output("instances=1", timeout=60)
    ns = stack.env["KVFLOW_NAMESPACE"]
    proc = stack.start("run", "in=http", f"out=dyn://{ns}.chosen.generate", "--http-port", "0")
    base = _ready_url(proc).removesuffix("/v1")
    await asyncio.sleep(0.5)  # both workers are registered by now; only one is served
    assert await _wait_models(base, {"here"}, timeout=3) == {"here"}


async def test_debug_route_explains_a_decision(stack, model_dir) -> None:
    import json
    import urllib.request

    base = stack.frontend()
    stack.start("worker", "--engine", "mocker", "--model-path", str(model_dir), "--model-name", "m",
                "--num-workers", "3", "--speedup-ratio", "0", "--block-size", "4")
    assert await _wait_models(base, {"m"}) == {"m"}
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    prompt = "the same long prefix for every request " * 4
    for _ in range(40):  # until all three instances are in the pool
        await client.completions.create(model="m", prompt=prompt, max_tokens=2)
        body = json.dumps({"model": "m", "prompt": prompt}).encode()
        req = urllib.request.Request(base + "/debug/route", body, {"Content-Type": "application/json"})
        decision = json.loads(await asyncio.to_thread(lambda r=req: urllib.request.urlopen(r).read()))
        if len(decision["costs"]) == 3:
            break
        await asyncio.sleep(0.1)
    await client.close()
    assert len(decision["costs"]) == 3 and len(decision["overlaps"]) == 3
    chosen = str(decision["worker_id"])
    assert decision["overlaps"][chosen] == decision["overlap_blocks"] > 0  # goes where the cache is
