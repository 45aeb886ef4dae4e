"""The native engine on CPU with a tiny device cache: prefixes come back from G2, G3, G4.

Greedy output after a prefix was evicted and loaded from a lower tier must be
token-identical to recomputing it, and the cached tokens are reported by tier.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from kvflow.kv.tiers import TierConfig
from kvflow.kv.tiers.object_store import S3Store
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens
from kvflow.testing.models import make_tiny_model

BLOCKS = 16  # device cache: 64 tokens at block size 4
PROMPT = prompt_ids(40, seed=11)  # 10 blocks
OTHER = prompt_ids(56, seed=12)  # 14 blocks: evicts PROMPT's blocks from the device


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiers-llama"), "llama")


_REFERENCE: dict[Path, list[int]] = {}


@pytest.fixture
async def reference(model: Path) -> list[int]:
    """PROMPT's greedy output computed from scratch (no tiers), once per module."""
    if model not in _REFERENCE:
        engine = await small_native_engine(model, num_gpu_blocks=BLOCKS)
        try:
            _REFERENCE[model] = tokens(await collect(engine, greedy_request("ref", PROMPT, 8)))
        finally:
            await engine.stop()
    return _REFERENCE[model]


def sample(engine: Any, name: str, **labels: str) -> float:
    registry = engine.scheduler.connector.tiers.metrics.registry
    return registry.get_sample_value(name, labels or None) or 0.0


async def run(engine: Any, rid: str, prompt: list[int]) -> tuple[list[int], dict[str, int] | None]:
    outs = await collect(engine, greedy_request(rid, prompt, 8))
    first = next(o for o in outs if o.cached_tokens is not None)
    return tokens(outs), first.cached_tokens_by_tier


async def evict_and_reload(engine: Any, uses: int = 1, tier: str = "host"
                           ) -> tuple[list[int], dict[str, int] | None]:
    for i in range(uses):
        await run(engine, f"p{i}", PROMPT)
    await run(engine, "other", OTHER)
    if tier != "host":  # lower tiers are written by a background thread: let it land
        for _ in range(200):
            if sample(engine, "kvflow_kv_offload_blocks_total", tier=tier) >= 4:
                break
            await asyncio.sleep(0.05)
    return await run(engine, "again", PROMPT)


@pytest.mark.parametrize(
    ("tier", "uses", "tiers"),
    [
        ("host", 1, {"host_kv_cache_gb": 0.01}),
        # the default admission rule writes a block to disk on its second use
        ("disk", 2, {"disk_kv_cache_dir": "{tmp}", "disk_kv_cache_gb": 0.01}),
    ],
)
async def test_prefix_evicted_to_a_tier_gives_identical_greedy_output(
    model: Path, reference: list[int], tmp_path: Path, tier: str, uses: int, tiers: dict,
) -> None:
    config = TierConfig(**{k: v.format(tmp=tmp_path) if isinstance(v, str) else v
                           for k, v in tiers.items()}, kv_onboard="always")
    engine = await small_native_engine(model, num_gpu_blocks=BLOCKS, tiers=config)
    try:
        out, by_tier = await evict_and_reload(engine, uses, tier)
        assert out == reference
        assert by_tier is not None and by_tier.get(tier, 0) >= 4 * 4, by_tier
        assert sum(by_tier.values()) <= len(PROMPT) - 1
        assert sample(engine, "kvflow_kv_onboard_blocks_total", tier=tier) >= 4
        assert sample(engine, "kvflow_kv_offload_blocks_total", tier=tier) >= 4
        # one observation per block read from disk; one per batched copy from host
        assert sample(engine, "kvflow_kv_onboard_seconds_count", tier=tier) >= (4 if tier == "disk" else 1)
        assert sample(engine, "kvflow_kv_tier_hit_rate", tier=tier) > 0
        if tier == "disk":
            assert sample(engine, "kvflow_kv_disk_bytes_per_served_token") > 0
    finally:
        await engine.stop()


async def test_a_disk_hit_below_an_emptied_host_tier_is_promoted_to_host(
    model: Path, reference: list[int], tmp_path: Path,
) -> None:
    config = TierConfig(host_kv_cache_gb=0.01, disk_kv_cache_dir=str(tmp_path),
                        disk_admit_after=1, kv_onboard="always")
    engine = await small_native_engine(model, num_gpu_blocks=BLOCKS, tiers=config)
    try:
        tiers = engine.scheduler.connector.tiers
        await run(engine, "p", PROMPT)
        await run(engine, "other", OTHER)  # PROMPT's blocks: host now, disk from the writer
        tiers.flush()
        assert tiers.host.clear()  # only the disk copy is left
        out, by_tier = await run(engine, "again", PROMPT)
        assert out == reference and by_tier is not None and by_tier.get("disk", 0) >= 16, by_tier
        assert len(tiers.host) >= 4  # the blocks loaded from disk now sit in host slots too
        await run(engine, "other2", OTHER)
        out, by_tier = await run(engine, "from-host", PROMPT)
        assert out == reference and by_tier is not None and by_tier.get("host", 0) >= 16, by_tier
    finally:
        await engine.stop()


async def test_object_store_shared_by_two_workers(model: Path, reference: list[int], s3_env) -> None:
    url = f"s3://kv-{uuid.uuid4().hex[:12]}/shared"
    S3Store(url, "x").ensure_bucket()
    config = TierConfig(kv_object_store=url, kv_offload="write-through", kv_onboard="always")
    a = await small_native_engine(model, num_gpu_blocks=BLOCKS, tiers=config)
    b = await small_native_engine(model, num_gpu_blocks=BLOCKS, tiers=config)
    try:
        assert (await run(a, "a", PROMPT))[0] == reference  # A computes and writes through
        a.scheduler.connector.tiers.flush()
        assert sample(a, "kvflow_kv_offload_blocks_total", tier="object") >= 9
        out, by_tier = await run(b, "b", PROMPT)  # B has never seen it: loads from G4
        assert out == reference
        assert by_tier == {"object": 36}
        assert sample(b, "kvflow_kv_onboard_blocks_total", tier="object") == 9
    finally:
        await a.stop()
        await b.stop()


async def test_disk_blocks_survive_a_restart_and_corrupt_ones_are_recomputed(
    model: Path, reference: list[int], tmp_path: Path,
) -> None:
    config = TierConfig(disk_kv_cache_dir=str(tmp_path), disk_admit_after=1, kv_onboard="always")
    first = await small_native_engine(model, num_gpu_blocks=BLOCKS, tiers=config)
    try:
        await run(first, "p", PROMPT)
        await run(first, "other", OTHER)  # evicts PROMPT's blocks to disk
        first.scheduler.connector.tiers.flush()
    finally:
        await first.stop()
    restarted = await small_native_engine(model, num_gpu_blocks=BLOCKS, tiers=config)
    try:
        out, by_tier = await run(restarted, "again", PROMPT)  # a fresh process's view of the dir
        assert out == reference and by_tier is not None and by_tier.get("disk", 0) >= 16
    finally:
        await restarted.stop()
    for path in tmp_path.rglob("*.kvb"):  # every record damaged: one flipped byte each
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x55
        path.write_bytes(bytes(data))
    damaged = await small_native_engine(model, num_gpu_blocks=BLOCKS, tiers=config)
    try:
        out, by_tier = await run(damaged, "damaged", PROMPT)
        assert out == reference  # recomputed, never loaded
        assert not by_tier or "disk" not in by_tier
        assert sample(damaged, "kvflow_kv_tier_rejected_blocks_total", tier="disk", reason="checksum") >= 1
    finally:
        await damaged.stop()


async def test_object_store_down_serving_continues(
    model: Path, reference: list[int], caplog, monkeypatch,
) -> None:
    from kvflow.testing.servers import S3Server

    server = S3Server()
    server.start()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    url = f"s3://kv-{uuid.uuid4().hex[:12]}/down"
    config = TierConfig(kv_object_store=url, kv_object_store_endpoint=server.url,
                        kv_object_store_timeout_s=0.5, kv_onboard="always", tier_retry_s=60)
    engine = None
    try:
        S3Store(url, "x", endpoint_url=server.url).ensure_bucket()
        engine = await small_native_engine(model, num_gpu_blocks=BLOCKS, tiers=config)
        server.kill()  # the store goes away while the worker serves
        for i in range(2):
            out, by_tier = await run(engine, f"r{i}", PROMPT)
            assert out == reference
            await run(engine, f"o{i}", OTHER)
        engine.scheduler.connector.tiers.flush()
        assert sample(engine, "kvflow_kv_tier_errors_total", tier="object", reason="unreachable") >= 1
        warnings = [r for r in caplog.records if "KV tier 'object' unavailable" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        if engine is not None:
            await engine.stop()
        server.close()


async def test_tiers_behind_the_disaggregation_connector(model: Path, reference: list[int]) -> None:
    """A worker with a KV connector of its own (disaggregation) keeps its tiers: requests the
    disagg connector does not take (no prefill/decode hint) fall through to them."""
    from kvflow.engines.base import EngineHooks
    from kvflow.kv.disagg import DisaggConnector

    hooks = EngineHooks(make_connector=lambda kv: DisaggConnector(kv, None, None))  # type: ignore[arg-type]
    config = TierConfig(host_kv_cache_gb=0.01, kv_onboard="always")
    engine = await small_native_engine(model, hooks, num_gpu_blocks=BLOCKS, tiers=config)
    try:
        assert isinstance(engine.scheduler.connector, DisaggConnector)
        out, by_tier = await evict_and_reload(engine)
        assert out == reference and by_tier is not None and by_tier.get("host", 0) >= 16
        tiers = engine.scheduler.connector.fallback.tiers
        assert tiers.metrics.registry.get_sample_value("kvflow_kv_onboard_blocks_total",
                                                       {"tier": "host"}) >= 4
        assert engine.scheduler.load_metrics().tier_block_s is not None  # published through it
    finally:
        await engine.stop()
