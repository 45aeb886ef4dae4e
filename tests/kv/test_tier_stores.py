"""The tier stores on their own: record format, host LRU, disk files and restarts, admission."""

from __future__ import annotations

import os

import pytest

from kvflow.kv.tiers.admission import AdmissionFilter
from kvflow.kv.tiers.disk import DiskStore
from kvflow.kv.tiers.host import HostStore
from kvflow.kv.tiers.record import HEADER_SIZE, BlockRejected, KvIdentity, decode_record, encode_record

ID = KvIdentity("tiny-llama", "L2 H4 D16 bs4 f32")


def test_record_round_trip_and_every_refusal() -> None:
    payload = bytes(range(256)) * 4
    record = encode_record(ID.fingerprint, 42, payload)
    assert bytes(decode_record(record, ID.fingerprint, 42)) == payload
    flipped = bytearray(record)
    flipped[HEADER_SIZE + 7] ^= 1
    cases = {
        "checksum": (bytes(flipped), ID.fingerprint, 42),
        "truncated": (record[:-10], ID.fingerprint, 42),
        "identity": (record, KvIdentity("other-model", ID.layout).fingerprint, 42),
        "hash": (record, ID.fingerprint, 43),
        "format": (b"XXXX" + record[4:], ID.fingerprint, 42),
    }
    for reason, args in cases.items():
        with pytest.raises(BlockRejected) as err:
            decode_record(*args)
        assert err.value.reason == reason
    with pytest.raises(BlockRejected, match="truncated"):
        decode_record(record[:5], ID.fingerprint, 42)


def test_host_store_is_an_lru_slab_of_block_slots() -> None:
    store = HostStore(capacity_bytes=350, block_bytes=100, identity=ID.fingerprint)
    assert store.num_slots == 3 and store.slab.shape == (3, 100)
    for h in range(3):
        assert store.put_payload(h, bytes([h]) * 100)
    assert store.get(0) is not None  # 0 becomes most recent; 1 is now the oldest
    assert store.put_payload(3, bytes([3]) * 100)
    assert [store.contains(h) for h in range(4)] == [True, False, True, True]
    assert store.used_bytes == 300
    assert not store.put_payload(9, bytes(101))  # not one block
    assert decode_record(store.get(3), ID.fingerprint, 3).tobytes() == bytes([3]) * 100
    store.discard(0)
    assert store.get(0) is None and store.used_bytes == 200
    with pytest.raises(ValueError, match="holds no KV block"):
        HostStore(capacity_bytes=99, block_bytes=100)


def test_host_store_reserves_consecutive_slots_and_never_reuses_pinned_ones() -> None:
    store = HostStore(capacity_bytes=40, block_bytes=10)  # 4 slots
    evicted: list[int] = []
    store.on_evict = evicted.append
    slots = store.reserve(3)
    assert slots == [0, 1, 2]
    store.commit([10, 11, 12], slots)
    pinned = store.acquire_run([10, 11, 99, 12])  # the leading run only
    assert pinned == [0, 1]
    again = store.reserve(3)  # needs two evictions; 10 and 11 are pinned, so 12 goes
    assert again == [2, 3] and evicted == [12]
    store.unreserve(again)
    store.discard(10)  # dropped while pinned: its slot stays taken until released
    assert 0 not in store.reserve(4)
    store.release(pinned)
    assert store.reserve(1) == [0]


def test_disk_store_writes_atomically_evicts_and_survives_a_restart(tmp_path) -> None:
    store = DiskStore(tmp_path, capacity_bytes=250, identity_key=ID.key_prefix)
    for h in (1, 2):
        assert store.put(h, bytes([h]) * 100)
    store.get(1)  # 2 is now the oldest
    assert store.put(3, bytes([3]) * 100)
    assert not store.contains(2) and store.get(1) == bytes([1]) * 100
    files = sorted(p.name for p in (tmp_path / ID.key_prefix).rglob("*") if p.is_file())
    assert files == [f"{1:016x}.kvb", f"{3:016x}.kvb"]  # no temp files, evicted one deleted
    # a crash mid-write leaves a temp file; a restart removes it and keeps the records
    (tmp_path / ID.key_prefix / "00" / "dead.123.456.tmp").write_bytes(b"partial")
    again = DiskStore(tmp_path, capacity_bytes=250, identity_key=ID.key_prefix)
    assert len(again) == 2 and again.used_bytes == 200
    assert again.get(3) == bytes([3]) * 100
    assert not list((tmp_path / ID.key_prefix).rglob("*.tmp"))


def test_disk_store_keeps_models_apart(tmp_path) -> None:
    a = DiskStore(tmp_path, 1000, ID.key_prefix)
    b = DiskStore(tmp_path, 1000, KvIdentity("other", ID.layout).key_prefix)
    a.put(7, b"a" * 10)
    assert b.get(7) is None and a.get(7) == b"a" * 10


def test_disk_store_file_vanishing_is_a_miss(tmp_path) -> None:
    store = DiskStore(tmp_path, 1000, ID.key_prefix)
    store.put(5, b"x" * 10)
    for path in (tmp_path / ID.key_prefix).rglob("*.kvb"):
        os.unlink(path)
    assert store.get(5) is None and not store.contains(5) and store.used_bytes == 0


def test_admission_filter_admits_on_the_second_use_within_the_window() -> None:
    adm = AdmissionFilter(admit_after=2, window=3)
    adm.note([1, 2])
    assert not adm.admits(1)
    adm.note([1])
    assert adm.admits(1) and not adm.admits(2)
    adm.note([3, 4, 5])  # the window of 3 forgets 1 and 2
    adm.note([2])
    assert not adm.admits(1) and not adm.admits(2)
    assert AdmissionFilter(admit_after=1).admits(99)
