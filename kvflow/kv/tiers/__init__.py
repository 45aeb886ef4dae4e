"""The tiered KV cache below the device: host memory (G2), local disk (G3), object store (G4).

    record.py       one stored block: identity, hash, checksum, KV bytes
    store.py        the store contract and TierUnavailable
    host.py / disk.py / object_store.py    the three stores (host: one slab of block slots)
    mover.py        batched copies between the engine's KV cache and host slab rows
    admission.py    the disk admission filter
    policy.py       load-vs-recompute prediction from measured speeds
    manager.py      TieredKvCache: offload, load, prefetch, faults
    metrics.py      Prometheus metrics per tier and direction
    config.py       TierConfig and its flags
"""

from kvflow.kv.tiers.config import TierConfig, add_tier_args, tier_config_from_args
from kvflow.kv.tiers.manager import LoadedRun, TieredKvCache
from kvflow.kv.tiers.record import BlockRejected, KvIdentity
from kvflow.kv.tiers.store import TierUnavailable

__all__ = [
    "BlockRejected",
    "KvIdentity",
    "LoadedRun",
    "TierConfig",
    "TierUnavailable",
    "TieredKvCache",
    "add_tier_args",
    "tier_config_from_args",
]
