"""Workers of one model with different KV block sizes: the second is refused, naming both sizes."""

from __future__ import annotations

import asyncio

import openai


async def test_second_worker_with_other_block_size_is_refused(stack, model_dir) -> None:
    base = stack.frontend()
    first = stack.start("worker", "--engine", "mocker", "--model-path", str(model_dir), "--model-name", "m",
                        "--speedup-ratio", "0", "--block-size", "16", name="worker")
    first.wait_for_output("worker: engine=mocker", timeout=60)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    for _ in range(200):
        if [m async for m in client.models.list()]:
            break
        await asyncio.sleep(0.05)
    second = stack.start("worker", "--engine", "mocker", "--model-path", str(model_dir), "--model-name", "m",
                         "--speedup-ratio", "0", "--block-size", "32", name="worker")
    code = await asyncio.to_thread(second.popen.wait, 60)
    assert code == 2
    out = second.output()
    assert "KV block size 16" in out and "block size is 32" in out and "Traceback" not in out
    assert first.alive()
    done = await client.completions.create(model="m", prompt="still served", max_tokens=3)
    assert done.usage.completion_tokens == 3
    await client.close()
