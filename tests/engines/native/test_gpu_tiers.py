"""The KV tiers on CUDA: batched G1<->G2 copies through a pinned slab, and a prefix
onboarded from G2 (and G3) giving the tokens of a recompute. Opt-in: -m gpu."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvflow.engines.native.config import NativeEngineConfig
from kvflow.engines.native.engine import NativeEngine
from kvflow.engines.native.kv_io import block_io
from kvflow.kv.layout import KvLayout
from kvflow.kv.tiers import TierConfig
from kvflow.kv.tiers import mover as mover_mod
from kvflow.kv.tiers.mover import BlockMover, host_tensor
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

PROMPT = prompt_ids(100, seed=21)  # 7 blocks of 16
OTHER = prompt_ids(150, seed=22)  # 10 blocks: evicts PROMPT from a 12-block device cache


@pytest.mark.parametrize("scattered", [False, True])
def test_cuda_mover_round_trip_through_a_pinned_slab(monkeypatch, scattered: bool) -> None:
    if scattered:
        monkeypatch.setattr(mover_mod, "SCATTERED", 0)
    monkeypatch.setattr(mover_mod, "CHUNK_BYTES", 4 * 2 * 4 * 16 * 8 * 64 * 2)  # 4-block chunks
    layout = KvLayout(num_layers=4, block_size=16, num_kv_heads=8, head_dim=64,
                      dtype="bfloat16", device="cuda", num_slots=33)
    whole = torch.randn(4, 2, 33, 16, 8, 64, device="cuda").to(torch.bfloat16)
    io = block_io(layout, whole)
    mover = BlockMover(io)
    assert mover.pinned and mover.chunk_blocks == 4
    slab = host_tensor(20, layout.block_bytes, pin=True)
    assert slab.is_pinned()
    blocks = [5, 0, 31, 7, 8, 9, 12, 2, 3, 30]
    rows = [10, 2, 19, 3, 4, 5, 6, 0, 1, 18]
    mover.to_host(blocks, slab, rows)
    for block, row in zip(blocks, rows, strict=True):
        assert slab[row].numpy().tobytes() == io.read_run(block, 1)
    before = whole.clone()
    targets = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    mover.to_device(targets, slab, rows)
    for target, block in zip(targets, blocks, strict=True):
        assert torch.equal(whole[:, :, target], before[:, :, block])
    untouched = [b for b in range(33) if b not in targets]
    assert torch.equal(whole[:, :, untouched], before[:, :, untouched])


async def _engine(path: Path, **kw: Any) -> NativeEngine:
    config = {"device": "cuda", "block_size": 16, "num_gpu_blocks": 12, "max_num_seqs": 4,
              "max_num_batched_tokens": 64, "max_model_len": 176, **kw}
    engine = NativeEngine(NativeEngineConfig(model_path=str(path), **config))
    await engine.start()
    return engine


async def _run(engine: NativeEngine, rid: str, prompt: list[int]) -> tuple[list[int], Any]:
    outs = await collect(engine, greedy_request(rid, prompt, 12))
    first = next(o for o in outs if o.cached_tokens is not None)
    return tokens(outs), first.cached_tokens_by_tier


@pytest.mark.parametrize("tier", ["host", "disk"])
async def test_cuda_prefix_onboarded_from_a_tier_equals_recompute(
    tier: str, tiny_models: Callable[[str], Path], tmp_path: Path
) -> None:
    path = tiny_models("llama_bf16")
    plain = await _engine(path)
    try:
        want, _ = await _run(plain, "ref", PROMPT)  # recomputed from scratch
    finally:
        await plain.stop()
    tiers = (TierConfig(host_kv_cache_gb=0.01, kv_onboard="always") if tier == "host" else
             TierConfig(disk_kv_cache_dir=str(tmp_path), kv_onboard="always"))
    engine = await _engine(path, tiers=tiers)
    try:
        connector: Any = engine.scheduler.connector  # type: ignore[union-attr]
        if tier == "host":
            assert connector.tiers.host.slab.is_pinned()
        uses = 1 if tier == "host" else 2  # disk admits a block on its second use
        for i in range(uses):
            assert (await _run(engine, f"p{i}", PROMPT))[0] == want
        await _run(engine, "other", OTHER)
        connector.tiers.flush()  # the writer thread's disk writes
        got, by_tier = await _run(engine, "again", PROMPT)
        assert got == want
        assert by_tier is not None and by_tier.get(tier, 0) >= 4 * 16, by_tier
    finally:
        await engine.stop()
