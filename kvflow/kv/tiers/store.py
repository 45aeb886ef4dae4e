"""The contract of one KV tier below the device (host, disk, object store), and its errors.

A store maps a sequence hash to a record (`record.py`) and is used from the tier
manager's threads, so every store is thread-safe. Ownership: `put` copies nothing the
caller keeps (records are immutable bytes); `get` returns bytes the caller owns.

A store that cannot work right now (disk full, directory not writable, object store
down or too slow) raises `TierUnavailable` with a metric-label reason; the manager
then skips the tier for a while with one warning, and serving goes on without it.
"""

from __future__ import annotations

from typing import Protocol

TIERS = ("device", "host", "disk", "object")  # G1, G2, G3, G4


class TierUnavailable(RuntimeError):
    """This tier cannot serve now; `reason` is a metric label, the message says why."""

    def __init__(self, tier: str, reason: str, detail: str) -> None:
        super().__init__(f"KV tier {tier!r} unavailable ({reason}): {detail}")
        self.tier = tier
        self.reason = reason


class KvStore(Protocol):
    """One tier's block storage, addressed by sequence hash."""

    tier: str  # "host" | "disk" | "object"
    shared: bool  # seen by every worker of the model (the object store)

    def contains(self, seq_hash: int) -> bool: ...

    def get(self, seq_hash: int) -> bytes | None:
        """The record stored under `seq_hash`, or None."""
        ...

    def put(self, seq_hash: int, record: bytes) -> bool:
        """Store (or refresh) a record; False when the store declined it (admission, size)."""
        ...

    def discard(self, seq_hash: int) -> None:
        """Drop a record (a corrupt one, say); no error if absent."""
        ...
