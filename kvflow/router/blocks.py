"""Which worker holds which KV block: a hash → worker-bitmask table with prefix matching.

Each worker gets a bit; each cached block hash maps to the OR of its holders' bits, and
each worker keeps the set of hashes it holds. Memory is proportional to the blocks cached
in the fleet; removing a worker costs O(its blocks). Prefix matching walks the request's
sequence hashes ANDing masks, so a 128-block prompt costs 128 dict lookups and int ANDs
whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

_NONE: frozenset[int] = frozenset()


@dataclass(frozen=True)
class OverlapScores:
    """Result of a prefix match.

    `scores[w]` is how many leading blocks of the request worker `w` holds (workers with
    none are absent). `frequencies[i]` is how many workers hold the first i+1 blocks.
    """

    scores: dict[int, int] = field(default_factory=dict)
    frequencies: list[int] = field(default_factory=list)

    def score(self, worker_id: int) -> int:
        return self.scores.get(worker_id, 0)


class OverlapIndex(Protocol):
    """What a router asks of an index, exact (KV events) or approximate."""

    def find_matches(self, block_hashes: Sequence[int]) -> OverlapScores: ...

    def remove_worker(self, worker_id: int) -> None: ...

    def workers(self) -> list[int]: ...

    def num_blocks(self) -> int: ...

    def num_worker_blocks(self, worker_id: int) -> int: ...


class BlockTable:
    """The shared store: hash → holders bitmask, worker → set of hashes."""

    def __init__(self) -> None:
        self._masks: dict[int, int] = {}
        self._held: dict[int, set[int]] = {}
        self._bit: dict[int, int] = {}
        self._worker_of_bit: list[int | None] = []
        self._free_bits: list[int] = []

    # --- workers -------------------------------------------------------------------
    def add_worker(self, worker_id: int) -> None:
        if worker_id in self._bit:
            return
        bit = self._free_bits.pop() if self._free_bits else len(self._worker_of_bit)
        if bit == len(self._worker_of_bit):
            self._worker_of_bit.append(None)
        self._worker_of_bit[bit] = worker_id
        self._bit[worker_id] = bit
        self._held[worker_id] = set()

    def remove_worker(self, worker_id: int) -> None:
        """Forget the worker and every block it holds."""
        if worker_id not in self._bit:
            return
        self.clear_worker(worker_id)
        bit = self._bit.pop(worker_id)
        del self._held[worker_id]
        self._worker_of_bit[bit] = None
        self._free_bits.append(bit)

    def clear_worker(self, worker_id: int) -> None:
        """Drop every block the worker holds but keep the worker."""
        held = self._held.get(worker_id)
        if not held:
            return
        keep = ~(1 << self._bit[worker_id])
        masks = self._masks
        for h in held:
            mask = masks[h] & keep
            if mask:
                masks[h] = mask
            else:
                del masks[h]
        held.clear()

    def has_worker(self, worker_id: int) -> bool:
        return worker_id in self._bit

    def workers(self) -> list[int]:
        return list(self._bit)

    # --- blocks --------------------------------------------------------------------
    def store(self, worker_id: int, hashes: Iterable[int]) -> None:
        self.add_worker(worker_id)
        flag = 1 << self._bit[worker_id]
        held = self._held[worker_id]
        masks = self._masks
        for h in hashes:
            masks[h] = masks.get(h, 0) | flag
            held.add(h)

    def remove(self, worker_id: int, hashes: Iterable[int]) -> None:
        held = self._held.get(worker_id)
        if held is None:
            return
        keep = ~(1 << self._bit[worker_id])
        masks = self._masks
        for h in hashes:
            if h not in held:
                continue
            held.discard(h)
            mask = masks[h] & keep
            if mask:
                masks[h] = mask
            else:
                del masks[h]

    def holds(self, worker_id: int, block_hash: int) -> bool:
        held = self._held.get(worker_id)
        return held is not None and block_hash in held

    def held_by(self, worker_id: int) -> AbstractSet[int]:
        """The hashes the worker holds, live (for membership tests in a hot loop; read only)."""
        return self._held.get(worker_id, _NONE)

    def num_blocks(self) -> int:
        """Distinct block hashes cached anywhere in the fleet."""
        return len(self._masks)

    def hashes_of(self, worker_id: int) -> list[int]:
        return list(self._held.get(worker_id, ()))

    def num_worker_blocks(self, worker_id: int) -> int:
        return len(self._held.get(worker_id, ()))

    # --- matching ------------------------------------------------------------------
    def find_matches(self, block_hashes: Sequence[int]) -> OverlapScores:
        """Per worker, the number of leading `block_hashes` it holds."""
        masks = self._masks
        scores: dict[int, int] = {}
        freqs: list[int] = []
        active = -1  # all bits
        count = 0
        for depth, h in enumerate(block_hashes):
            mask = masks.get(h, 0)
            narrowed = active & mask
            if narrowed != active:
                if depth > 0:
                    self._record(active & ~narrowed, depth, scores)
                active = narrowed
                if not active:
                    break
                count = active.bit_count()
            freqs.append(count)
        else:
            if active > 0:
                self._record(active, len(block_hashes), scores)
        return OverlapScores(scores=scores, frequencies=freqs)

    def _record(self, bits: int, depth: int, scores: dict[int, int]) -> None:
        owner = self._worker_of_bit
        while bits:
            low = bits & -bits
            worker = owner[low.bit_length() - 1]
            if worker is not None:
                scores[worker] = depth
            bits ^= low
