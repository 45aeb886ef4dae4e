"""The KV data plane: layout descriptors, the engine-core connector contract, block I/O, transfers.

- layout.py: `KvLayout` and the compatibility check between two workers.
- blocks.py: `KvBlockIO` (read/write runs of blocks as bytes) and run merging.
- connector.py: `KvConnector`, the scheduler's hooks (load, save, before-evict).
"""

from kvflow.kv.blocks import BlockRun, KvBlockIO, RegionBlockIO, pair_runs
from kvflow.kv.connector import (
    NO_EXTERNAL,
    BaseConnector,
    ExternalMatch,
    KvConnector,
    LoadResult,
)
from kvflow.kv.layout import KvLayout, KvLayoutMismatch, check_compatible

__all__ = [
    "NO_EXTERNAL",
    "BaseConnector",
    "BlockRun",
    "ExternalMatch",
    "KvBlockIO",
    "KvConnector",
    "KvLayout",
    "KvLayoutMismatch",
    "LoadResult",
    "RegionBlockIO",
    "check_compatible",
    "pair_runs",
]
