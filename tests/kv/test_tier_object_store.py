"""G4 against a real S3-compatible server (moto, a process on 127.0.0.1): sharing and faults."""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid

import pytest

from kvflow.kv.tiers import KvIdentity, TierConfig, TieredKvCache
from kvflow.kv.tiers.object_store import ObjectStoreUrl, S3Store
from kvflow.kv.tiers.record import encode_record
from kvflow.testing.servers import S3Server

ID = KvIdentity("tiny-llama", "L2 H4 D16 bs4 f32")
BLOCK = 2048


def payload(h: int) -> bytes:
    return bytes([h % 251]) * BLOCK


def sample(cache: TieredKvCache, name: str, **labels: str) -> float:
    return cache.metrics.registry.get_sample_value(name, labels or None) or 0.0


def new_bucket_url() -> str:
    url = f"s3://kv-{uuid.uuid4().hex[:12]}/fleet/a"
    S3Store(url, ID.key_prefix).ensure_bucket()
    return url


def worker(url: str, **kwargs: object) -> TieredKvCache:
    cache = TieredKvCache(TierConfig(kv_object_store=url, kv_object_store_timeout_s=0.5, **kwargs),  # type: ignore[arg-type]
                          ID, BLOCK, block_size=16)
    cache.costs.observe_prefill(16, 1.6)  # as measured on a slow engine: loading pays
    return cache


def test_url_parsing() -> None:
    assert ObjectStoreUrl.parse("s3://b/p/q/") == ObjectStoreUrl("b", "p/q")
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        ObjectStoreUrl.parse("http://b/p")


def test_a_block_offloaded_by_one_worker_is_loaded_by_another(s3_env) -> None:
    url = new_bucket_url()
    a, b = worker(url), worker(url)
    try:
        for h in (1, 2):
            a.offload(h, payload(h))
        a.flush()
        assert sample(a, "kvflow_kv_offload_blocks_total", tier="object") == 2
        run = b.load([1, 2, 3])
        assert run.tiers == ["object", "object"] and bytes(run.payloads[1]) == payload(2)
        assert sample(b, "kvflow_kv_onboard_bytes_total", tier="object") == 2 * BLOCK
        other = TieredKvCache(TierConfig(kv_object_store=url), KvIdentity("other-model", ID.layout),
                              BLOCK, block_size=4)
        assert other.load([1]).hashes == []  # another model's namespace: never shared
        other.close()
    finally:
        a.close()
        b.close()


def test_a_corrupt_object_is_refused(s3_env) -> None:
    url = new_bucket_url()
    cache = worker(url)
    try:
        store = cache.stores[0]
        store.put(7, encode_record(ID.fingerprint, 7, payload(7))[:-100])  # cut short
        assert cache.load([7]).hashes == []
        assert sample(cache, "kvflow_kv_tier_rejected_blocks_total", tier="object", reason="truncated") == 1
    finally:
        cache.close()


def test_object_store_down_or_slow_is_skipped_with_one_warning(monkeypatch, caplog) -> None:
    server = S3Server()
    try:
        server.start()
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        url = new_bucket_url()
        cache = worker(url, host_kv_cache_gb=0.001, tier_retry_s=0.2)
        cache.offload(1, payload(1))
        cache.flush()
        assert sample(cache, "kvflow_kv_offload_blocks_total", tier="object") == 1
        os.kill(server.proc.pid, signal.SIGSTOP)  # slow: accepts, never answers
        with caplog.at_level(logging.WARNING, logger="kvflow.kv.tiers.manager"):
            started = time.monotonic()
            assert cache.load([1]).tiers == ["host"]  # host still serves
            cache.stores[0].discard(1)  # host copy gone: G4 would be next
            assert cache.load([1]).hashes == []
            cache.offload(2, payload(2))
            cache.flush()
        assert time.monotonic() - started < 10
        assert sample(cache, "kvflow_kv_tier_errors_total", tier="object", reason="timeout") >= 1
        assert len([r for r in caplog.records if "object" in r.getMessage()]) == 1
        os.kill(server.proc.pid, signal.SIGCONT)
        server.kill()  # down: connection refused
        time.sleep(0.3)  # past tier_retry_s, the tier is tried again
        assert cache.load([1]).hashes == []
        assert sample(cache, "kvflow_kv_tier_errors_total", tier="object", reason="unreachable") >= 1
        cache.close()
    finally:
        if server.running:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.close()


def test_offloads_are_dropped_not_queued_forever_when_the_writer_is_stuck(monkeypatch) -> None:
    from kvflow.kv.tiers import manager

    server = S3Server()
    try:
        server.start()
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        url = new_bucket_url()
        monkeypatch.setattr(manager, "OFFLOAD_QUEUE", 2)
        cache = worker(url, host_kv_cache_gb=0.001)
        os.kill(server.proc.pid, signal.SIGSTOP)  # the writer's first call hangs until timeout
        for h in range(1, 7):
            cache.offload(h, payload(h))
        assert sample(cache, "kvflow_kv_offload_dropped_total", tier="all") >= 1
        assert cache.load([1, 2, 3, 4, 5, 6]).tiers == ["host"] * 6  # host took every block
        os.kill(server.proc.pid, signal.SIGCONT)
        cache.close()
    finally:
        if server.running:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.close()
