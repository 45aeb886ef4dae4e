"""TierConfig: which KV tiers below the device a worker keeps, their sizes and policy, and flags.

Flags are derived from the dataclass (defaults included); a worker passes the config
to its engine, which builds a `TieredKvCache` from it once the KV layout is known.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

OFFLOAD_POLICIES = ("write-back", "write-through")
ONBOARD_POLICIES = ("predicted", "always")
_GIB = 1 << 30


@dataclass(frozen=True)
class TierConfig:
    """G2 host memory, G3 disk, G4 object store; all off by default."""

    host_kv_cache_gb: float = 0.0  # G2 size; 0 = no host tier
    disk_kv_cache_dir: str | None = None  # G3 directory; None = no disk tier
    disk_kv_cache_gb: float = 16.0
    # Disk admission: a block is written to disk only once this many requests used it
    # (computed or hit) within the last `disk_admission_window` distinct blocks seen.
    disk_admit_after: int = 2
    disk_admission_window: int = 1 << 18
    kv_object_store: str | None = None  # G4: s3://bucket/prefix; None = none
    kv_object_store_endpoint: str | None = None  # default: AWS_ENDPOINT_URL / AWS default
    kv_object_store_timeout_s: float = 2.0
    kv_offload: str = "write-back"  # or "write-through": save a request's blocks when it ends
    # "predicted": load a lower-tier hit only when predicted faster than recomputing it;
    # "always": load every hit (tests, or when the operator knows the store is fast).
    kv_onboard: str = "predicted"
    tier_retry_s: float = 30.0  # a tier that failed is skipped this long, then retried

    def __post_init__(self) -> None:
        if self.kv_offload not in OFFLOAD_POLICIES:
            raise ValueError(f"--kv-offload must be one of {', '.join(OFFLOAD_POLICIES)}, "
                             f"got {self.kv_offload!r}")
        if self.kv_onboard not in ONBOARD_POLICIES:
            raise ValueError(f"--kv-onboard must be one of {', '.join(ONBOARD_POLICIES)}, "
                             f"got {self.kv_onboard!r}")
        if self.host_kv_cache_gb < 0 or self.disk_kv_cache_gb <= 0:
            raise ValueError("--host-kv-cache-gb must be >= 0 and --disk-kv-cache-gb > 0")
        if self.disk_admit_after < 1 or self.disk_admission_window < 1:
            raise ValueError("--disk-admit-after and the admission window must be >= 1")
        if self.kv_object_store is not None and not self.kv_object_store.startswith("s3://"):
            raise ValueError(f"--kv-object-store must look like s3://bucket/prefix, "
                             f"got {self.kv_object_store!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.host_kv_cache_gb or self.disk_kv_cache_dir or self.kv_object_store)

    @property
    def host_bytes(self) -> int:
        return int(self.host_kv_cache_gb * _GIB)

    @property
    def disk_bytes(self) -> int:
        return int(self.disk_kv_cache_gb * _GIB)


_HELP = {
    "host_kv_cache_gb": "GiB of host memory for KV blocks evicted from the device (G2; 0 = off); "
                        "one slab, page-locked when the engine runs on CUDA",
    "disk_kv_cache_dir": "directory for KV blocks on local disk (G3; unset = off)",
    "disk_kv_cache_gb": "GiB the disk tier may use",
    "disk_admit_after": "write a block to disk once this many requests used it (1 = always)",
    "disk_admission_window": "distinct blocks the disk admission filter remembers",
    "kv_object_store": "shared KV tier in an S3-compatible store, s3://bucket/prefix (G4)",
    "kv_object_store_endpoint": "S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)",
    "kv_object_store_timeout_s": "seconds before an object-store call counts as failed",
    "kv_offload": "write-back (on eviction) or write-through (when a request ends)",
    "kv_onboard": "predicted (load a hit only if faster than recompute) or always",
    "tier_retry_s": "seconds a failed tier is skipped before it is tried again",
}


def add_tier_args(parser: argparse.ArgumentParser) -> None:
    """Add the KV tier flags (`--host-kv-cache-gb`, ...) to a worker's parser."""
    group = parser.add_argument_group("KV cache tiers")
    defaults = TierConfig()
    for f in fields(TierConfig):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f"tiers_{f.name}", type=kind,
            default=getattr(defaults, f.name), metavar=f.name.upper(),
            choices={"kv_offload": OFFLOAD_POLICIES, "kv_onboard": ONBOARD_POLICIES}.get(f.name),
            help=f"{_HELP[f.name]} (default: %(default)s)")


def tier_config_from_args(ns: argparse.Namespace) -> TierConfig:
    return TierConfig(**{f.name: getattr(ns, f"tiers_{f.name}") for f in fields(TierConfig)})
