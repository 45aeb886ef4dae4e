"""Messages engines publish about their KV cache and load, consumed by routers.

One message module for the KV event channel, one codec (msgpack via msgspec).
Every event carries a per-worker, monotonically increasing `event_id` so a consumer
can detect gaps and recover by asking the worker for a `CacheSnapshot`.

`medium` says which tier a stored/removed event is about: None (older workers) and
"device" mean the engine's own cache (G1); "host", "disk" and "object" are the tiers
of `kvflow.kv.tiers` (G2-G4). Snapshots describe the device tier only.
"""

from __future__ import annotations

import msgspec

KV_EVENTS_SUBJECT = "kv_events"
LOAD_METRICS_SUBJECT = "load_metrics"


class StoredBlock(msgspec.Struct, array_like=True):
    """A full block that entered the cache: its sequence hash and its tokens."""

    block_hash: int
    token_ids: list[int]


class BlocksStored(msgspec.Struct, tag="stored"):
    """Consecutive blocks of one sequence stored; `parent_hash` precedes the first."""

    blocks: list[StoredBlock]
    parent_hash: int | None = None
    medium: str | None = None  # None / "device": G1; "host", "disk", "object": lower tiers


class BlocksRemoved(msgspec.Struct, tag="removed"):
    block_hashes: list[int]
    medium: str | None = None


class AllCleared(msgspec.Struct, tag="cleared"):
    pass


KvEventData = BlocksStored | BlocksRemoved | AllCleared


class KvEvent(msgspec.Struct):
    worker_id: int
    event_id: int
    data: KvEventData


class KvEventBatch(msgspec.Struct):
    """Events published together (one per engine iteration, in event_id order)."""

    worker_id: int
    events: list[KvEvent]


class CachedBlock(msgspec.Struct, array_like=True):
    block_hash: int
    parent_hash: int | None


class CacheSnapshot(msgspec.Struct):
    """A worker's whole cache state as of `last_event_id`, in parent-before-child order."""

    worker_id: int
    last_event_id: int
    blocks: list[CachedBlock]


class LoadMetrics(msgspec.Struct, omit_defaults=True):
    """Published about once per engine iteration (throttled)."""

    worker_id: int
    active_blocks: int
    total_blocks: int
    num_waiting: int
    num_running: int
    prefill_tokens_inflight: int = 0
    host_active_blocks: int = 0
    host_total_blocks: int = 0
    # Measured seconds to load one block per tier, and to recompute one ("recompute").
    tier_block_s: dict[str, float] | None = None
    # The worker's KV tier metrics (kvflow.kv.tiers.metrics) as "sample|tier|reason" -> value,
    # so a frontend's /metrics can show them too.
    tier_counters: dict[str, float] | None = None
