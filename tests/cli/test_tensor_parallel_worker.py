"""`kvflow worker --engine native --tensor-parallel-size 2` behind a frontend: serves, stops, dies loudly."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest

from kvflow.testing.procs import Proc

pytest.importorskip("torch", reason="the native engine needs torch (kvflow[torch])")


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (read from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and " Z " in Path(f"/proc/{pid}/stat").read_text()


async def _tp_worker(stack, tmp_path: Path) -> tuple[str, Proc, int]:
    from kvflow.testing.models import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-llama", "llama")
    base = stack.frontend()
    worker = stack.start("worker", "--engine", "native", "--model-path", str(model),
                         "--model-name", "tp2", "--device", "cpu", "--cpu-kv-cache-gb", "0.05",
                         "--tensor-parallel-size", "2", name="worker")
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused") as client:
        deadline = time.monotonic() + 90
        while {m.id async for m in client.models.list()} != {"tp2"}:
            assert worker.alive(), worker.output()[-3000:]
            assert time.monotonic() < deadline, "the TP=2 worker never registered"
            time.sleep(0.2)
    ranks = _children(worker.pid)
    assert len(ranks) == 1, f"expected one rank-1 process under the worker, got {ranks}"
    return base, worker, ranks[0]


async def test_tp2_worker_serves_and_stops_on_sigterm(stack, tmp_path: Path) -> None:
    base, worker, rank1 = await _tp_worker(stack, tmp_path)
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused") as client:
        outs = [await client.completions.create(model="tp2", prompt="hello tensor parallel world",
                                                max_tokens=8, temperature=0) for _ in range(2)]
    assert outs[0].usage.completion_tokens == 8
    assert outs[0].choices[0].text == outs[1].choices[0].text
    assert worker.terminate(30) == 0, worker.output()[-3000:]
    deadline = time.monotonic() + 10
    while not _gone(rank1):
        assert time.monotonic() < deadline, "rank 1 outlived the engine"
        time.sleep(0.1)


async def test_a_dead_rank_takes_the_engine_down_with_a_clear_error(stack, tmp_path: Path) -> None:
    _, worker, rank1 = await _tp_worker(stack, tmp_path)
    os.kill(rank1, signal.SIGKILL)
    try:
        worker.popen.wait(30)
    except Exception:
        pytest.fail("the engine hung after its rank 1 died:\n" + worker.output()[-3000:])
    assert worker.popen.returncode != 0
    assert "tensor-parallel rank 1" in worker.output() and "exited with code -9" in worker.output()
