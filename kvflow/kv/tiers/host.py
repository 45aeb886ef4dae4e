"""G2: KV records in host memory, least recently used first out, bounded in bytes.

On CUDA engines the copy to and from the device goes through a pinned staging buffer
owned by the engine; this store keeps the records themselves as immutable bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable


class HostStore:
    """An LRU of records bounded by `capacity_bytes`."""

    tier = "host"
    shared = False

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"host KV cache needs a positive size, got {capacity_bytes} bytes")
        self.capacity_bytes = capacity_bytes
        self._lru: OrderedDict[int, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.on_evict: Callable[[int], None] | None = None  # called with each hash dropped

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._lru)

    def contains(self, seq_hash: int) -> bool:
        return seq_hash in self._lru

    def get(self, seq_hash: int) -> bytes | None:
        with self._lock:
            record = self._lru.get(seq_hash)
            if record is not None:
                self._lru.move_to_end(seq_hash)
            return record

    def put(self, seq_hash: int, record: bytes) -> bool:
        if len(record) > self.capacity_bytes:
            return False
        with self._lock:
            old = self._lru.pop(seq_hash, None)
            if old is not None:
                self._bytes -= len(old)
            self._lru[seq_hash] = record
            self._bytes += len(record)
            while self._bytes > self.capacity_bytes:
                gone, dropped = self._lru.popitem(last=False)
                self._bytes -= len(dropped)
                if self.on_evict is not None:
                    self.on_evict(gone)
        return True

    def discard(self, seq_hash: int) -> None:
        with self._lock:
            old = self._lru.pop(seq_hash, None)
            if old is not None:
                self._bytes -= len(old)
