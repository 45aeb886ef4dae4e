"""Disaggregation on one GPU: KV transfer GB/s against the device's copy bandwidth, TTFT added.

    PYTHONPATH=. .venv/bin/python bench/disagg_gpu.py [--model-dir DIR] [--prompts 8]

Needs an NVIDIA GPU (written for one H200; not run on the CPU-only dev machine). Builds
(or reuses, --model-dir) a Llama-3.1-8B-shaped model with random weights (32 layers,
8 KV heads x 128 dims, bf16: 128 KiB of KV per token), then starts three native worker
processes on the one GPU: an aggregated one (model "agg") and a prefill + decode pair
(model "m"). An in-process frontend pipeline (ModelWatcher, --disagg-mode always) sends
the same 2,048-token prompts to both models, greedy, 16 tokens each, and reports:

- device copy bandwidth: torch device-to-device copies of 1 GiB, measured in this run;
- transfer GB/s: each decode worker's pull (bytes / seconds, from the first output's
  `kv_transfer`, describe + copy + release), and its ratio to the copy bandwidth
  (target >= 50%); the backend used (cuda_ipc expected);
- TTFT of aggregated vs disaggregated (median), and the TTFT added (target <= 10%);
- whether every disaggregated output equals the aggregated one.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

from kvflow.frontend.disagg import DisaggConfig
from kvflow.frontend.models import ModelManager
from kvflow.frontend.watcher import ModelWatcher
from kvflow.llm.protocol import KvTransferStats, PreprocessedRequest, SamplingOptions, StopConditions
from kvflow.router.config import KvRouterConfig
from kvflow.runtime import Context, DistributedRuntime, RuntimeConfig
from kvflow.testing.models import make_tiny_model
from kvflow.testing.procs import Proc, kvflow_proc, runtime_env

LLAMA_8B = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                intermediate_size=14336, max_position_embeddings=8192, dtype="bfloat16")


def copy_bandwidth(gib: int = 1, repeat: int = 20) -> float:
    """Bytes/s of device-to-device copies (each byte read once and written once)."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        dst.copy_(src)
    torch.cuda.synchronize()
    return repeat * src.numel() / (time.perf_counter() - start)


def start_workers(model_dir: Path, env: dict[str, str], log_dir: Path) -> list[Proc]:
    common = ("worker", "--engine", "native", "--device", "cuda", "--model-path", str(model_dir),
              "--gpu-memory-utilization", "0.28", "--max-model-len", "4096")
    specs = [("agg", "--component", "agg"), ("m", "--role", "prefill"), ("m", "--role", "decode")]
    return [kvflow_proc(*common, "--model-name", name, *rest, env=env, log_dir=log_dir,
                        name=f"worker-{name}") for name, *rest in specs]


async def generate(models: ModelManager, name: str, ids: list[int]) -> tuple[float, list[int],
                                                                          KvTransferStats | None]:
    model = models.get(name)
    assert model is not None
    request = PreprocessedRequest(f"{name}-{uuid.uuid4().hex[:8]}", ids,
                                  sampling=SamplingOptions(temperature=0.0),
                                  stop=StopConditions(max_tokens=16, ignore_eos=True))
    start = time.perf_counter()
    ttft, tokens, stats = 0.0, [], None
    async for out in model.engine.generate(request, Context()):
        if out.token_ids and not tokens:
            ttft = time.perf_counter() - start
        stats = stats or out.kv_transfer
        tokens += out.token_ids
    return ttft, tokens, stats


async def wait_ready(watcher: ModelWatcher, procs: list[Proc], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not (watcher.pools.get("agg") and watcher.pools.get("m")
               and watcher.disagg.prefill_for("m")):
        if any(not p.alive() for p in procs):
            raise SystemExit("a worker exited:\n" + next(p for p in procs if not p.alive()).output()[-3000:])
        if time.monotonic() > deadline:
            raise SystemExit("workers did not register in time")
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace, model_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="disagg-gpu-"))
    settings = dict(discovery="file", discovery_path=str(tmp / "discovery"),
                    namespace="gpu" + uuid.uuid4().hex[:6])
    procs = start_workers(model_dir, runtime_env(**settings), tmp / "logs")
    runtime = await DistributedRuntime(RuntimeConfig(**settings)).start()  # type: ignore[arg-type]
    models = ModelManager()
    watcher = ModelWatcher(runtime, models, KvRouterConfig(), disagg=DisaggConfig(mode="always"))
    await watcher.start()
    try:
        await wait_ready(watcher, procs)
        await report(models, args)
    finally:
        await watcher.close()
        await runtime.shutdown()
        for proc in procs:
            proc.stop()


async def report(models: ModelManager, args: argparse.Namespace) -> None:
    rng = random.Random(0)
    bandwidth = copy_bandwidth()
    for _ in range(2):  # warm-up: graphs, kernels, first transfer
        ids = [rng.randrange(3, 500) for _ in range(args.prompt_len)]
        await generate(models, "agg", ids)
        await generate(models, "m", ids)
    agg_ttft, dis_ttft, rates, same, backends = [], [], [], 0, set()
    for _ in range(args.prompts):
        ids = [rng.randrange(3, 500) for _ in range(args.prompt_len)]
        t_agg, want, _ = await generate(models, "agg", ids)
        t_dis, got, stats = await generate(models, "m", ids)
        agg_ttft.append(t_agg)
        dis_ttft.append(t_dis)
        same += got == want
        if stats is not None and stats.seconds > 0:
            rates.append(stats.bytes / stats.seconds)
            backends.add(stats.backend)
    gbps = statistics.median(rates) if rates else 0.0
    added = statistics.median(dis_ttft) / statistics.median(agg_ttft) - 1
    print(f"device copy bandwidth      {bandwidth / 1e9:8.1f} GB/s")
    print(f"KV transfer (median)       {gbps / 1e9:8.1f} GB/s  = {gbps / bandwidth:5.1%} of copy "
          f"bandwidth  (backend {', '.join(sorted(backends)) or 'none'}; target >= 50%)")
    print(f"TTFT aggregated (median)   {statistics.median(agg_ttft) * 1000:8.1f} ms")
    print(f"TTFT disaggregated         {statistics.median(dis_ttft) * 1000:8.1f} ms  "
          f"(+{added:.1%}; target <= 10%)")
    print(f"outputs identical          {same}/{args.prompts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="an 8B-shaped model directory (default: build one with random weights)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/disagg_gpu.py needs an NVIDIA GPU")
    model_dir = args.model_dir
    if model_dir is None or not (model_dir / "config.json").exists():
        model_dir = model_dir or Path(tempfile.mkdtemp(prefix="llama8b-")) / "model"
        print(f"building a random-weight 8B-shaped model in {model_dir} ...", flush=True)
        make_tiny_model(model_dir, "llama", **LLAMA_8B)  # type: ignore[arg-type]
    asyncio.run(run(args, model_dir))


if __name__ == "__main__":
    main()
