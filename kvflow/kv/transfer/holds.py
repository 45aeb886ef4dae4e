"""Blocks a prefill worker keeps for transfers, each under a lease that releases it.

`add` is called from the engine (its thread, under its lock) when a prefill request
finishes; `release` when the puller is done, or `expire` when the lease runs out (a
decode worker died mid-transfer): either way the blocks go to `on_release`, which hands
them back to the scheduler (connector `take_released`). Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hold:
    block_ids: list[int]
    num_tokens: int
    expires_at: float


class HoldTable:
    """transfer id -> held blocks, with a lease per hold."""

    def __init__(self, lease_s: float, on_release: Callable[[list[int]], None]) -> None:
        self.lease_s = lease_s
        self._on_release = on_release
        self._holds: dict[str, Hold] = {}
        self._lock = threading.Lock()
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._holds)

    def add(self, transfer_id: str, block_ids: list[int], num_tokens: int) -> None:
        hold = Hold(list(block_ids), num_tokens, time.monotonic() + self.lease_s)
        with self._lock:
            old = self._holds.pop(transfer_id, None)
            self._holds[transfer_id] = hold
        if old is not None:
            self._on_release(old.block_ids)

    def get(self, transfer_id: str) -> Hold | None:
        with self._lock:
            return self._holds.get(transfer_id)

    def release(self, transfer_id: str) -> bool:
        """Drop a hold; False if it was not held (never, or its lease ran out)."""
        with self._lock:
            hold = self._holds.pop(transfer_id, None)
        if hold is not None:
            self._on_release(hold.block_ids)
        return hold is not None

    def expire(self, now: float | None = None) -> int:
        """Release every hold whose lease ran out; how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [k for k, h in self._holds.items() if h.expires_at <= now]
            holds = [self._holds.pop(k) for k in gone]
        for hold in holds:
            self._on_release(hold.block_ids)
        self.num_expired += len(holds)
        return len(holds)

    def release_all(self) -> None:
        with self._lock:
            holds, self._holds = list(self._holds.values()), {}
        for hold in holds:
            self._on_release(hold.block_ids)
