"""Disaggregated native engine on CPU: 1 prefill + 1 decode process, greedy-identical to aggregated."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvflow.testing.models import make_tiny_model

NATIVE = ("--engine", "native", "--num-gpu-blocks", "128", "--block-size", "8",
          "--max-num-seqs", "8", "--max-num-batched-tokens", "32")  # prompts span several chunks
BACKENDS = {"cpu": "shm", "cuda": "cuda_ipc"}  # what same-host peers should use


@pytest.fixture(scope="module")
def native_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("disagg-native") / "llama")


def native_worker(chaos, model: Path, name: str, device: str, *args: str):
    from kvflow.testing.servers import free_port

    from .conftest import Worker

    port = free_port()
    proc = chaos.start("worker", *NATIVE, "--device", device, "--model-path", str(model),
                       "--model-name", name, *args,
                       name=f"native-{name}", system_port=port)
    return Worker(proc, port)


async def complete(client, model: str, ids: list[int]) -> str:
    out = await client.completions.create(model=model, prompt=ids, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 12
    return out.choices[0].text


async def _expect_aggregated_output(chaos, url: str, decode, prompts: list[list[int]],
                                    backend: str, label: str) -> None:
    """Model "m" (prefill + decode workers) answers each prompt as "agg" does; the decode
    worker pulled every block over `backend`, and the frontend counted the same bytes."""
    async with chaos.client(timeout=120) as client:
        await _until_model(client, "m")
        await _until_model(client, "agg")
        for ids in prompts:
            want = await complete(client, "agg", ids)
            got = await complete(client, "m", ids)
            assert got == want, f"{label} output differs for a {len(ids)}-token prompt"
    moved = decode.metric("kv_transfer_bytes_total", family="kvflow_")
    blocks = decode.metric("kv_transfer_blocks_total", family="kvflow_")
    # 2 layers x (K, V) x 8 tokens x 2 kv heads x 16 dims x 4 bytes = 4 KiB per block,
    # every KV head of a block once whatever the TP split
    assert blocks >= 9 and moved == blocks * 4096
    assert f'backend="{backend}"' in decode._get("/metrics").decode()
    assert decode.metric("kv_transfer_failures_total", family="kvflow_") == 0
    from .test_disagg import frontend_metric

    assert frontend_metric(url, "kvflow_kv_transfer_bytes_total") == moved


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
async def test_prefill_decode_split_matches_aggregated_greedy(
    chaos, native_model: Path, device: str
) -> None:
    url = chaos.frontend("--disagg-mode", "always")
    native_worker(chaos, native_model, "agg", device, "--component", "agg")
    native_worker(chaos, native_model, "m", device, "--role", "prefill")
    decode = native_worker(chaos, native_model, "m", device, "--role", "decode")
    await _until(lambda: "has prefill workers" in chaos.procs[0].output(), 90)
    await _until(lambda: decode.registered(), 90)
    rng = random.Random(5)
    base = [rng.randrange(3, 400) for _ in range(70)]
    prompts = [
        base,                                            # 70 tokens: 3 chunks of 32
        base + [rng.randrange(3, 400) for _ in range(30)],  # prefix hit on both sides
        [rng.randrange(3, 400) for _ in range(9)],       # one block and a bit
        [*base[:40], 7, 8, 9],                         # partial prefix hit
    ]
    await _expect_aggregated_output(chaos, url, decode, prompts, BACKENDS[device], "disaggregated")


async def _until(check, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def _until_model(client, name: str) -> None:
    for _ in range(300):
        models = await client.models.list()
        if any(m.id == name for m in models.data):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"model {name} never listed")


def _two_gpus() -> bool:
    import torch

    return torch.cuda.device_count() >= 2


GPU2 = [pytest.mark.gpu, pytest.mark.skipif("not _two_gpus()", reason="needs 2 GPUs")]
# On CPU these are slow-marked (5 torch processes start on the dev box: ~40 s each); the
# default run covers TP=2 -> TP=1 and TP=1 -> TP=2 with in-process engines
# (tests/engines/native/test_tensor_parallel.py) and every split at the agent level
# (tests/kv/test_transfer_tp.py).
TP_CASES = [  # prefill TP, decode TP, device, decode's --kv-transfer-backends
    *(pytest.param(p, d, "cpu", b, id=f"tp{p}-tp{d}-{b}", marks=pytest.mark.slow)
      for p, d, b in ((2, 2, "shm"), (2, 2, "tcp"), (2, 1, "tcp"), (1, 2, "shm"))),
    *(pytest.param(p, d, "cuda", "cuda_ipc", id=f"tp{p}-tp{d}-cuda_ipc", marks=GPU2)
      for p, d in ((2, 1), (1, 2), (2, 2))),
    pytest.param(2, 2, "cuda", "tcp", id="tp2-tp2-cuda-tcp", marks=GPU2),
]


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "device", "backend"), TP_CASES)
async def test_tensor_parallel_prefill_decode_matches_aggregated_tp1(
    chaos, native_model: Path, prefill_tp: int, decode_tp: int, device: str, backend: str
) -> None:
    """Worker processes with their rank processes: a TP=`prefill_tp` prefill worker, a
    TP=`decode_tp` decode worker pulling over `backend` (heads re-sliced when the sizes
    differ), greedy output equal to an aggregated TP=1 worker's."""
    url = chaos.frontend("--disagg-mode", "always")
    native_worker(chaos, native_model, "agg", device, "--component", "agg")
    native_worker(chaos, native_model, "m", device, "--role", "prefill",
                  "--tensor-parallel-size", str(prefill_tp))
    decode = native_worker(chaos, native_model, "m", device, "--role", "decode",
                           "--tensor-parallel-size", str(decode_tp),
                           "--kv-transfer-backends", backend)
    try:
        await _until(lambda: "has prefill workers" in chaos.procs[0].output(), 120)
        await _until(lambda: decode.registered(), 120)
    except AssertionError:
        for proc in chaos.procs:
            print(proc.output()[-3000:])
        raise
    rng = random.Random(7)
    base = [rng.randrange(3, 400) for _ in range(70)]
    prompts = [base, [*base[:40], 7, 8, 9], [rng.randrange(3, 400) for _ in range(9)]]
    await _expect_aggregated_output(chaos, url, decode, prompts, backend,
                                    f"TP={prefill_tp} -> TP={decode_tp}")
