"""kvflow's overhead around vLLM: TTFT and tokens/s, vLLM's OpenAI server vs kvflow frontend + vLLM worker.

Both run the same tiny random-weight model with the same vLLM engine args on
this machine, one after the other, at concurrency 1 and 16 (streamed
completions of token-id prompts, `ignore_eos`, fixed output length). Needs the
vLLM venv (`bash scripts/dev.sh engine vllm`). Bounded: ~2 engine start-ups
(a minute or two each on a loaded 2-core machine) plus the measured runs.

    PYTHONPATH=$PWD python bench/vllm_overhead.py [--requests 32] [--osl 32]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import openai

from kvflow.testing.procs import Proc, runtime_env

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_ARGS = ["--block-size", "32", "--max-model-len", "512", "--max-num-seqs", "16",
             "--dtype", "float32", "--enforce-eager"]


@dataclass(frozen=True)
class Level:
    server: str
    concurrency: int
    ttft_ms: list[float]
    tokens: int
    seconds: float

    def p50(self) -> float:
        return statistics.median(self.ttft_ms)

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client: openai.AsyncOpenAI, prompt: list[int], osl: int) -> tuple[float, int]:
    """(TTFT in ms, streamed chunks) for one streamed completion."""
    start, first, chunks = time.perf_counter(), 0.0, 0
    stream = await client.completions.create(
        model="tiny", prompt=prompt, max_tokens=osl, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text is not None:
            chunks += 1
            first = first or time.perf_counter()
    return (first - start) * 1000, chunks


async def level(server: str, url: str, concurrency: int, requests: int, osl: int) -> Level:
    prompts = [[3 + (i * 7 + j) % 400 for j in range(64)] for i in range(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttft: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            t, n = await one(client, queue.get_nowait(), osl)
            ttft.append(t)
            tokens += n

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    await one(client, [1, 2, 3], 2)  # warm-up
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return Level(server, concurrency, ttft, tokens, time.perf_counter() - start)


def wait_http(url: str, proc: Proc, timeout: float = 600) -> None:
    """Until `url` lists the model "tiny"."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.alive, proc.output()[-3000:]
        try:
            if any(m.id == "tiny" for m in client.models.list().data):
                return
        except openai.APIError:
            pass
        time.sleep(1)
    raise TimeoutError(proc.output()[-3000:])


def run_vllm_server(model: Path, env: dict, logs: Path, args: argparse.Namespace) -> list[Level]:
    port = free_port()
    proc = Proc([str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                 "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), *VLLM_ARGS],
                env, logs / "vllm-server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url, proc)
        return [asyncio.run(level("vllm", url, c, args.requests, args.osl)) for c in (1, 16)]
    finally:
        proc.stop()


def run_kvflow(model: Path, env: dict, logs: Path, args: argparse.Namespace) -> list[Level]:
    worker = Proc([str(VLLM_PY), "-m", "kvflow.cli.main", "worker", "--engine", "vllm", "--model-path",
                   str(model), "--model-name", "tiny", "--", *VLLM_ARGS], env, logs / "worker.log")
    frontend = Proc([sys.executable, "-m", "kvflow.cli.main", "frontend", "--http-port", "0"],
                    env, logs / "frontend.log")
    try:
        frontend.wait_for_output("frontend: listening on", timeout=120)
        url = re.search(r"listening on (http://\S+)", frontend.output()).group(1)  # type: ignore[union-attr]
        wait_http(url, worker)
        return [asyncio.run(level("kvflow", url, c, args.requests, args.osl)) for c in (1, 16)]
    finally:
        frontend.stop()
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--osl", type=int, default=32, help="output tokens per request")
    args = parser.parse_args()
    if not VLLM_PY.exists():
        sys.exit(f"{VLLM_PY} missing: run `bash scripts/dev.sh engine vllm` first")
    from kvflow.testing.models import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="kvflow-bench-vllm-"))
    model = make_tiny_model(tmp / "llama", "llama", hidden_size=128, num_heads=2, num_kv_heads=1,
                            intermediate_size=256)
    env = runtime_env(discovery="file", discovery_path=tmp / "discovery", event_plane="zmq",
                      namespace="bench" + uuid.uuid4().hex[:6])
    env.update(PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1")
    (tmp / "logs").mkdir()
    base = run_vllm_server(model, env, tmp / "logs", args)
    ours = run_kvflow(model, env, tmp / "logs", args)
    print(f"{'server':8} {'conc':>4} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'tok/s':>8}")
    for lv in base + ours:
        p90 = statistics.quantiles(lv.ttft_ms, n=10)[-1]
        print(f"{lv.server:8} {lv.concurrency:>4} {lv.p50():>12.1f} {p90:>12.1f} {lv.tokens_per_s():>8.1f}")
    for b, o in zip(base, ours, strict=True):
        print(f"concurrency {b.concurrency}: kvflow adds {o.p50() - b.p50():+.1f} ms TTFT p50; "
              f"tokens/s ratio kvflow/vllm = {o.tokens_per_s() / b.tokens_per_s():.3f}")
    print(f"logs: {tmp / 'logs'}")


if __name__ == "__main__":
    main()
