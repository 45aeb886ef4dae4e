"""G2: KV blocks in one host memory slab (page-locked on CUDA engines), least recently used out.

The slab is a single `[slots, block_bytes]` uint8 tensor allocated once, sized by
`--host-kv-cache-gb`; each slot holds one block's KV in wire order. The engine's
`BlockMover` copies runs of blocks between the slab and the device cache with a few
tensor ops (mover.py); this store only does the bookkeeping:

- `reserve(n)` hands out free slots, lowest first, so a batch evicted together lands
  in consecutive slots and comes back with one copy; it evicts least-recently-used
  entries for room. `commit` makes the copied slots visible under their hashes.
- `acquire_run(hashes)` pins the slots of the leading run of `hashes` held here (a
  pinned slot is never evicted or reused) until `release`; loads copy from pinned
  slots on a background thread while the engine keeps offloading.

Blocks in G2 never leave the process, so they carry no checksum here: the record
(identity, hash, xxh3 checksum; record.py) is made when a block is written below (G3,
G4) or asked for through `get`, and checked on every load from those tiers.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from kvflow.kv.tiers.record import decode_record, encode_record

if TYPE_CHECKING:
    import torch


class HostStore:
    """A slab of `capacity_bytes // block_bytes` block slots with an LRU index."""

    tier = "host"
    shared = False

    def __init__(self, capacity_bytes: int, block_bytes: int, *, identity: int = 0,
                 pin: bool = False) -> None:
        if block_bytes <= 0:
            raise ValueError(f"a KV block needs a positive size, got {block_bytes} bytes")
        slots = capacity_bytes // block_bytes
        if slots < 1:
            raise ValueError(f"--host-kv-cache-gb holds no KV block: {capacity_bytes} bytes for "
                             f"blocks of {block_bytes} bytes")
        self.block_bytes = block_bytes
        self.identity = identity
        from kvflow.kv.tiers.mover import host_tensor  # torch: only once a host tier exists

        self.slab: torch.Tensor = host_tensor(slots, block_bytes, pin=pin)
        self.capacity_bytes = slots * block_bytes
        self._lru: OrderedDict[int, int] = OrderedDict()  # hash -> slot, oldest first
        self._owner: dict[int, int] = {}  # slot -> hash, for indexed slots
        self._pins: dict[int, int] = {}  # slot -> loads copying from it
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._lock = threading.Lock()
        self.on_evict: Callable[[int], None] | None = None  # called with each hash dropped

    @property
    def num_slots(self) -> int:
        return self.slab.shape[0]

    @property
    def num_free(self) -> int:
        """Slots neither indexed nor reserved."""
        return len(self._free)

    @property
    def used_bytes(self) -> int:
        return len(self._lru) * self.block_bytes

    def __len__(self) -> int:
        return len(self._lru)

    def contains(self, seq_hash: int) -> bool:
        return seq_hash in self._lru

    # ---- batched use (the engine's offload and onboard) ---------------------------------

    def reserve(self, n: int) -> list[int]:
        """Up to `n` free slots (fewer when pinned slots fill the slab), evicting LRU entries."""
        evicted: list[int] = []
        with self._lock:
            while len(self._free) < n and self._evict_one(evicted):
                pass
            slots = [heapq.heappop(self._free) for _ in range(min(n, len(self._free)))]
        self._report(evicted)
        return slots

    def commit(self, hashes: Sequence[int], slots: Sequence[int]) -> None:
        """Make reserved `slots` (now holding the blocks' KV) visible under `hashes`."""
        with self._lock:
            for seq_hash, slot in zip(hashes, slots, strict=True):
                self._drop(seq_hash)
                self._lru[seq_hash] = slot
                self._owner[slot] = seq_hash

    def unreserve(self, slots: Sequence[int]) -> None:
        with self._lock:
            for slot in slots:
                heapq.heappush(self._free, slot)

    def acquire_run(self, hashes: Sequence[int]) -> list[int]:
        """Pin and return the slots of the leading run of `hashes` held here (most recent now)."""
        out: list[int] = []
        with self._lock:
            for seq_hash in hashes:
                slot = self._lru.get(seq_hash)
                if slot is None:
                    break
                self._lru.move_to_end(seq_hash)
                self._pins[slot] = self._pins.get(slot, 0) + 1
                out.append(slot)
        return out

    def release(self, slots: Sequence[int]) -> None:
        with self._lock:
            for slot in slots:
                left = self._pins[slot] - 1
                if left:
                    self._pins[slot] = left
                    continue
                del self._pins[slot]
                if slot not in self._owner:  # dropped while a load copied from it
                    heapq.heappush(self._free, slot)

    def _drop(self, seq_hash: int) -> None:
        """Unindex `seq_hash`; its slot is free now, or once the last load releases it."""
        slot = self._lru.pop(seq_hash, None)
        if slot is None:
            return
        del self._owner[slot]
        if slot not in self._pins:
            heapq.heappush(self._free, slot)

    def payload(self, slot: int) -> memoryview:
        """A slot's bytes (valid while the slot is pinned or its entry is not evicted)."""
        return memoryview(self.slab[slot].numpy())

    def _evict_one(self, evicted: list[int]) -> bool:
        for seq_hash, slot in self._lru.items():
            if slot not in self._pins:
                self._drop(seq_hash)
                evicted.append(seq_hash)
                return True
        return False

    def _report(self, evicted: list[int]) -> None:
        if self.on_evict is not None:
            for seq_hash in evicted:
                self.on_evict(seq_hash)

    # ---- one block at a time (the KvStore contract: records) ----------------------------

    def put_payload(self, seq_hash: int, payload: bytes | memoryview) -> bool:
        """Copy one block's KV into a slot; False if it does not fit or no slot is free."""
        if len(payload) != self.block_bytes or seq_hash in self._lru:
            return seq_hash in self._lru
        slots = self.reserve(1)
        if not slots:
            return False
        self.slab[slots[0]].numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
        self.commit([seq_hash], slots)
        return True

    def get(self, seq_hash: int) -> bytes | None:
        """The block as a full record (identity, hash, checksum), e.g. for a lower tier."""
        with self._lock:
            slot = self._lru.get(seq_hash)
            if slot is None:
                return None
            self._lru.move_to_end(seq_hash)
            return encode_record(self.identity, seq_hash, self.payload(slot))

    def put(self, seq_hash: int, record: bytes) -> bool:
        return self.put_payload(seq_hash, decode_record(record, self.identity, seq_hash))

    def clear(self) -> list[int]:
        """Drop every entry (pinned slots come free once released); the hashes dropped."""
        with self._lock:
            gone = list(self._lru)
            for seq_hash in gone:
                self._drop(seq_hash)
        self._report(gone)
        return gone

    def discard(self, seq_hash: int) -> None:
        with self._lock:
            self._drop(seq_hash)
