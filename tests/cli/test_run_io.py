"""kvflow run in=batch / in=text, and the custom engine example behind `kvflow frontend`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import openai

from kvflow.llm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _run(stack, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvflow.cli.main", "run", *args], env=stack.env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_batch_file(stack, model_dir, tmp_path) -> None:
    src = tmp_path / "requests.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "first line"}]},
        {"prompt": "second line", "max_tokens": 2},
        {"prompt": "bad", "max_tokens": -5},
    ]) + "\n")
    out = _run(stack, f"in=batch:{src}", "out=echo", "--model-path", str(model_dir), "--model-name", "b")
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in (tmp_path / "requests.out.jsonl").read_text().splitlines()]
    assert [r["status"] for r in results] == [200, 200, 400]
    assert "first line" in results[0]["response"]["choices"][0]["message"]["content"]
    assert results[1]["response"]["usage"]["completion_tokens"] == 2
    assert results[2]["response"]["error"]["param"] == "max_tokens"


def test_text_chat(stack, model_dir) -> None:
    out = _run(stack, "in=text", "out=echo", "--model-path", str(model_dir), stdin="hello terminal\n\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "hello terminal" in out.stdout.split("> ", 1)[1]


async def test_custom_engine_example(stack, model_dir) -> None:
    base = stack.frontend()
    from kvflow.testing.procs import python_proc

    proc = python_proc(ROOT / "examples" / "custom_engine.py", "--model-path", str(model_dir),
                       "--delay", "0", env={**stack.env, "PYTHONPATH": os.pathsep.join(sys.path)},
                       log_dir=stack.log_dir, name="custom")
    stack.procs.append(proc)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    for _ in range(150):
        if [m async for m in client.models.list()]:
            break
        await asyncio.sleep(0.1)
    out = await client.completions.create(model="reverse", prompt="abc xyz", max_tokens=50)
    tok = Tokenizer.from_dir(model_dir)
    assert out.choices[0].text == tok.decode(list(reversed(tok.encode("abc xyz"))))
    assert out.choices[0].finish_reason == "stop"
    await client.close()


def test_disaggregated_stack_in_one_command(stack, model_dir, tmp_path) -> None:
    src = tmp_path / "disagg.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": "ab cd ef gh " * 8, "max_tokens": n,
                                         "ignore_eos": True}) for n in (3, 5)) + "\n")
    out = _run(stack, f"in=batch:{src}", "out=mocker", "--model-path", str(model_dir),
               "--model-name", "d", "--prefill-workers", "1", "--decode-workers", "1",
               "--disagg-mode", "always", "--speedup-ratio", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "has prefill workers" in out.stderr
    results = [json.loads(x) for x in (tmp_path / "disagg.out.jsonl").read_text().splitlines()]
    assert [r["response"]["usage"]["completion_tokens"] for r in results] == [3, 5]
    bad = _run(stack, "in=batch:/dev/null", "out=mocker", "--prefill-workers", "1")
    assert bad.returncode != 0 and "--decode-workers" in bad.stderr
