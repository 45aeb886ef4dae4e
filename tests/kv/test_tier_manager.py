"""TieredKvCache: offload and load through host and disk, the policy, and the disk faults."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvflow.kv.tiers import KvIdentity, TierConfig, TieredKvCache
from kvflow.kv.tiers.disk import DiskStore
from kvflow.kv.tiers.policy import PrefillRate

ID = KvIdentity("tiny-llama", "L2 H4 D16 bs4 f32")
BLOCK = 4096


def payload(h: int) -> bytes:
    return bytes([h % 251]) * BLOCK


def sample(cache: TieredKvCache, name: str, **labels: str) -> float:
    value = cache.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


@pytest.fixture
def make_cache() -> Iterator:
    made: list[TieredKvCache] = []

    def make(**kwargs: object) -> TieredKvCache:
        cache = TieredKvCache(TierConfig(**kwargs), ID, BLOCK, block_size=4)  # type: ignore[arg-type]
        cache.costs.observe_prefill(16, 1.6)  # a slow engine: every load pays (policy aside)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, check=False)
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator:
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        if not _mount_tmpfs(path, options):
            pytest.skip("needs root to mount a small tmpfs (a real full / read-only disk)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_host_offload_then_load_in_order(make_cache) -> None:
    cache = make_cache(host_kv_cache_gb=0.001)
    for h in (1, 2, 3):
        cache.offload(h, payload(h))
    run = cache.load([1, 2, 9, 3])  # stops at the first miss
    assert run.hashes == [1, 2] and run.tiers == ["host", "host"]
    assert bytes(run.payload(1)) == payload(2)
    assert run.payloads == [None, None]  # host blocks stay in their (pinned) slab slots
    assert sample(cache, "kvflow_kv_onboard_blocks_total", tier="host") == 0
    cache.landed(run, 0.002)  # the engine copied them: counted now, slots unpinned
    assert sample(cache, "kvflow_kv_onboard_blocks_total", tier="host") == 2
    assert sample(cache, "kvflow_kv_offload_blocks_total", tier="host") == 3
    assert sample(cache, "kvflow_kv_onboard_seconds_count", tier="host") == 1  # one batch
    assert sample(cache, "kvflow_kv_tier_hit_rate", tier="host") == 1.0
    assert cache.costs.per_block_s["host"].value == pytest.approx(0.001)


def test_disk_admits_blocks_used_twice_and_survives_a_restart(make_cache, tmp_path) -> None:
    cache = make_cache(disk_kv_cache_dir=str(tmp_path), disk_kv_cache_gb=0.01)
    cache.note_use([1, 2])
    cache.note_use([1])  # block 1 used by two requests, block 2 by one
    cache.offload(1, payload(1))
    cache.offload(2, payload(2))
    cache.flush()
    assert cache.load([1]).tiers == ["disk"]
    assert cache.load([2]).hashes == []
    cache.metrics.served(100)
    assert sample(cache, "kvflow_kv_disk_bytes_per_served_token") > BLOCK / 100
    restarted = make_cache(disk_kv_cache_dir=str(tmp_path), disk_kv_cache_gb=0.01)
    assert bytes(restarted.load([1]).payloads[0]) == payload(1)


def test_a_corrupt_block_on_disk_is_refused_and_counted(make_cache, tmp_path) -> None:
    cache = make_cache(disk_kv_cache_dir=str(tmp_path), disk_admit_after=1)
    for h in (1, 2):
        cache.offload(h, payload(h))
    cache.flush()
    path = next(p for p in tmp_path.rglob("*.kvb") if p.stem == f"{2:016x}")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cache.load([1, 2]).hashes == [1]  # block 2 is recomputed, never loaded
    assert sample(cache, "kvflow_kv_tier_rejected_blocks_total", tier="disk", reason="checksum") == 1
    path.write_bytes(bytes(data[:100]))  # truncated: gone from the index after the refusal
    assert cache.load([1, 2]).hashes == [1]


def test_a_run_read_in_parallel_is_timed_once_as_a_whole(make_cache, tmp_path) -> None:
    """Blocks of a run are read side by side: each read's own time counts the others' share
    of the disk; the run's time over its blocks is what a block costs."""
    cache = make_cache(disk_kv_cache_dir=str(tmp_path), disk_admit_after=1)
    for h in range(1, 7):
        cache.offload(h, payload(h))
    cache.flush()
    assert cache.costs.per_block_s["disk"].samples == 0
    assert cache.load(list(range(1, 7))).hashes == list(range(1, 7))
    assert cache.costs.per_block_s["disk"].samples == 1


def test_disk_blocks_are_read_straight_into_host_slots_and_promoted(make_cache, tmp_path) -> None:
    cache = make_cache(host_kv_cache_gb=0.001, disk_kv_cache_dir=str(tmp_path), disk_admit_after=1)
    host = cache.host
    assert host is not None
    for h in (1, 2, 3):
        cache.offload(h, payload(h))
    cache.flush()
    host.clear()  # only the disk holds them now
    free = host.num_free
    run = cache.load([1, 2, 3])
    assert run.tiers == ["disk"] * 3 and run.payloads == [None] * 3  # in reserved slots
    assert all(s >= 0 for s in run.slots) and host.num_free == free - 3
    assert [bytes(run.payload(i)) for i in range(3)] == [payload(h) for h in (1, 2, 3)]
    cache.landed(run, 0.001)  # the engine copied them: now they are host blocks
    assert all(host.contains(h) for h in (1, 2, 3)) and host.num_free == free - 3
    assert bytes(host.payload(host.acquire_run([2])[0])) == payload(2)

    host.clear()
    path = next(p for p in tmp_path.rglob("*.kvb") if p.stem == f"{3:016x}")
    path.write_bytes(path.read_bytes() + b"x")  # longer than its header says: refused
    free = host.num_free
    run = cache.load([1, 2, 3])
    assert run.hashes == [1, 2] and host.num_free == free - 2  # block 3's slot went back
    assert sample(cache, "kvflow_kv_tier_rejected_blocks_total", tier="disk", reason="truncated") == 1
    run.release()  # dropped without a copy (an aborted request): every reserved slot back
    assert host.num_free == free and not host.contains(1)


def test_a_block_of_another_model_is_never_loaded(make_cache, tmp_path) -> None:
    other = DiskStore(tmp_path, 1 << 20, ID.key_prefix)
    from kvflow.kv.tiers.record import encode_record

    other.put(5, encode_record(KvIdentity("other", ID.layout).fingerprint, 5, payload(5)))
    cache = make_cache(disk_kv_cache_dir=str(tmp_path))
    assert cache.load([5]).hashes == []
    assert sample(cache, "kvflow_kv_tier_rejected_blocks_total", tier="disk", reason="identity") == 1


def test_loading_slower_than_recompute_is_skipped(make_cache) -> None:
    cache = make_cache(host_kv_cache_gb=0.001)
    cache.offload(1, payload(1))
    cache.costs.observe_prefill(1_000_000, 1e-6)  # measured: recompute is nearly free
    assert cache.load([1]).hashes == []
    assert sample(cache, "kvflow_kv_onboard_skipped_total", tier="host") == 1
    cache.costs.recompute_s_per_token = PrefillRate(prior=1.0)  # recompute: a second a token
    assert cache.load([1]).hashes == [1]


def test_full_disk_skips_the_tier_with_one_warning(make_cache, tmpfs, caplog) -> None:
    disk = tmpfs("full", "size=16k")
    cache = make_cache(host_kv_cache_gb=0.001, disk_kv_cache_dir=str(disk), disk_admit_after=1)
    with caplog.at_level(logging.WARNING, logger="kvflow.kv.tiers.manager"):
        for h in range(1, 9):
            cache.offload(h, payload(h))
        cache.flush()
    warnings = [r for r in caplog.records if "disk_full" in r.getMessage()]
    assert len(warnings) == 1
    assert sample(cache, "kvflow_kv_tier_errors_total", tier="disk", reason="disk_full") == 1
    assert cache.load(list(range(1, 9))).tiers == ["host"] * 8  # serving goes on from host


def test_unwritable_disk_dir_is_skipped_at_start(make_cache, tmp_path, tmpfs, caplog) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="kvflow.kv.tiers.manager"):
        cache = make_cache(host_kv_cache_gb=0.001, disk_kv_cache_dir=str(blocker / "kv"))
    assert cache.tiers == ["host"]
    assert sample(cache, "kvflow_kv_tier_errors_total", tier="disk", reason="unwritable") == 1
    assert len([r for r in caplog.records if "unwritable" in r.getMessage()]) == 1
    # a disk that turns read-only while serving: writes fail, the tier is skipped
    disk = tmpfs("ro", "size=1m")
    late = make_cache(disk_kv_cache_dir=str(disk), disk_admit_after=1)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    late.offload(1, payload(1))
    late.flush()
    assert sample(late, "kvflow_kv_tier_errors_total", tier="disk", reason="unwritable") == 1
    assert late.load([1]).hashes == []
