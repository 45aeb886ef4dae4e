"""Small first-hour fixes, each through real processes: batch lines, model names, UTF-8 cuts, ids."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request

import openai

from kvflow.llm.tokenizer import Tokenizer


def _run(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvflow.cli.main", "run", *args], env=stack.env,
                          capture_output=True, text=True, timeout=120)


def test_batch_skips_bad_lines_with_their_numbers(stack, model_dir, tmp_path) -> None:
    src = tmp_path / "requests.jsonl"
    src.write_text('{"prompt": "one", "max_tokens": 1}\n{not json\n[1, 2]\n\n'
                   '{"messages": [{"role": "user", "content": "five"}]}\n')
    out = _run(stack, f"in=batch:{src}", "out=echo", "--model-path", str(model_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{src}:2: not valid JSON" in out.stderr and f"{src}:3: not a JSON object" in out.stderr
    assert "Traceback" not in out.stderr
    results = [json.loads(x) for x in (tmp_path / "requests.out.jsonl").read_text().splitlines()]
    assert [(r["line"], r["status"]) for r in results] == [(1, 200), (5, 200)]


async def test_model_name_is_the_directory_name_and_utf8_cut_is_clean(stack, model_dir) -> None:
    proc = stack.start("run", "in=http", "out=echo", "--model-path", str(model_dir), "--http-port", "0")
    proc.wait_for_output("ready at", timeout=60)
    base = re.search(r"ready at (http://\S+)", proc.output()).group(1)  # type: ignore[union-attr]
    client = openai.AsyncOpenAI(base_url=base, api_key="unused")
    assert [m.id async for m in client.models.list()] == [model_dir.name]
    prompt = "ab 😀"
    ids = Tokenizer.from_dir(model_dir).encode(prompt)
    assert len(ids) >= 4  # the emoji takes several byte tokens
    cut = await client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=len(ids) - 1)
    assert cut.choices[0].finish_reason == "length"
    assert "\ufffd" not in cut.choices[0].text and cut.choices[0].text.startswith("ab")
    pieces = []
    async for chunk in await client.completions.create(model=model_dir.name, prompt=prompt,
                                                       max_tokens=len(ids) - 1, stream=True):
        pieces.extend(c.text for c in chunk.choices)
    assert "\ufffd" not in "".join(pieces)
    whole = await client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=50)
    assert whole.choices[0].text == prompt
    # Worker ids: hex in /debug/route, as in the logs ("first worker <hex>").
    req = urllib.request.Request(base.removesuffix("/v1") + "/debug/route", json.dumps(
        {"model": model_dir.name, "prompt": "x"}).encode(), {"Content-Type": "application/json"})
    decision = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=30).read()))
    logged = re.search(r"first worker ([0-9a-f]+)", proc.output()).group(1)  # type: ignore[union-attr]
    assert decision["worker_id"] == logged and list(decision["overlaps"]) == [logged]
    await client.close()


def test_native_engine_says_what_it_loaded(stack, tmp_path) -> None:
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvflow.testing.models import make_tiny_model

    model = make_tiny_model(tmp_path / "tinyw", max_position_embeddings=512)
    proc = stack.start("worker", "--engine", "native", "--model-path", str(model), "--max-num-seqs", "8",
                       name="worker")
    proc.wait_for_output("KV cache of", timeout=120)
    out = proc.output()
    assert "native engine: loading" in out and "on cpu as float32" in out and "weights loaded in" in out
    # Sized to what 8 sequences of 512 tokens can use, not to the 1 GB --cpu-kv-cache-gb.
    assert re.search(r"KV cache of 256 blocks x 16 tokens \(4096 tokens, [0-9.]+ GiB\) on cpu", out), out
