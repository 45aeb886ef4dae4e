"""Tensor-parallel KV memories for tests: a whole cache split by KV head into /dev/shm regions."""

from __future__ import annotations

import numpy as np

from kvflow.kv.shm import SharedRegion


def head_shards(full: np.ndarray, n: int) -> list[SharedRegion]:
    """What the n ranks of a TP=n engine hold of `full` ([slab, slot, token, head, dim]):
    rank r's share of the heads, each in its own region (the caller closes them)."""
    heads = full.shape[3]
    out = []
    for r in range(n):
        part = np.ascontiguousarray(full[:, :, :, r * heads // n : (r + 1) * heads // n])
        region = SharedRegion.create(part.nbytes)
        region.view[:] = part.tobytes()
        out.append(region)
    return out
