"""How fast the disk tier's read path can go on this machine: per-block files read the way
`kv/tiers/disk.py` reads them (`read_bytes`, a fresh buffer per block) against reading the
same files into memory that is already allocated and touched (as the pinned host slab is),
with the same 8 threads the tier manager fetches on, and a memcpy floor.

    .venv/bin/python bench/tier_disk_read.py [--blocks 256] [--block-mib 2] [--dir DIR]

The files stay in the page cache (warm reads): this measures the CPU side of a G3 hit,
not the disk. An 8B-shape block of 16 tokens is 2 MiB. The last lines time the tier
manager's own first `load` of the same number of checked disk blocks (a process's first
G3 hit of that size), read into the host tier's
slots (as with `--host-kv-cache-gb`) and into a buffer each (no host tier).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def gbps(nbytes: int, fn: Callable[[], object], reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--block-mib", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    size = int(args.block_mib * (1 << 20))
    total = size * args.blocks
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = [Path(tmp) / f"{i:04d}.kvb" for i in range(args.blocks)]
        data = os.urandom(size)
        for p in paths:
            p.write_bytes(data)
        slab = np.ones((args.blocks, size), np.uint8)  # allocated and touched, like the slab

        def read_into(i: int) -> None:
            with open(paths[i], "rb", buffering=0) as f:
                f.readinto(memoryview(slab[i]))

        with ThreadPoolExecutor(args.threads) as pool:
            fresh = gbps(total, lambda: list(pool.map(lambda p: p.read_bytes(), paths)))
            into = gbps(total, lambda: list(pool.map(read_into, range(args.blocks))))
        src = np.frombuffer(data, np.uint8)
        floor = gbps(total, lambda: [np.copyto(slab[i], src) for i in range(args.blocks)])
    print(f"{args.blocks} blocks of {size / (1 << 20):.1f} MiB, {args.threads} threads, warm page cache")
    print(f"memcpy floor (one thread):                 {floor:6.2f} GB/s")
    print(f"read_bytes, a fresh buffer per block:      {fresh:6.2f} GB/s ({fresh / floor:.2f}x floor)")
    print(f"readinto touched memory (the slab):        {into:6.2f} GB/s ({into / floor:.2f}x floor)")
    print(f"readinto / read_bytes:                     {into / fresh:6.2f}x")
    slots_gbps, buffers_gbps = manager_loads(args.blocks, size, args.dir)
    print("TieredKvCache.load, the first (cold) load of the run, one timing each:")
    print(f"  into host slots:                         {slots_gbps:6.2f} GB/s "
          f"({slots_gbps / floor:.2f}x floor)")
    print(f"  no host tier (a buffer per block):       {buffers_gbps:6.2f} GB/s "
          f"({buffers_gbps / floor:.2f}x floor; slots / buffers {slots_gbps / buffers_gbps:.2f}x)")


def manager_loads(blocks: int, size: int, where: Path | None) -> tuple[float, float]:
    """GB/s of the tier manager loading `blocks` disk blocks (checked), with a host tier
    (read straight into its reserved slots) and without one (a buffer per block)."""
    from kvflow.kv.tiers import KvIdentity, TierConfig, TieredKvCache

    identity = KvIdentity("bench", "disk-read")
    out = []
    for host_gb in (size * (blocks + 1) / 1e9 * 1.1, 0.0):
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            cache = TieredKvCache(TierConfig(host_kv_cache_gb=host_gb, disk_kv_cache_dir=tmp,
                                             disk_kv_cache_gb=size * blocks * 2 / 1e9,
                                             disk_admit_after=1), identity, size, block_size=16)
            cache.costs.observe_prefill(16, 16.0)  # every load pays
            data = os.urandom(size)
            for h in range(1, blocks + 1):
                cache.offload(h, data)
            cache.flush()
            hashes = list(range(1, blocks + 1))
            if cache.host is not None:
                cache.host.clear()  # only the disk holds them
            started = time.perf_counter()  # the first load: nothing allocated for it yet
            run = cache.load(hashes)
            first = time.perf_counter() - started
            assert len(run) == blocks
            run.release()
            cache.close()
            out.append(size * blocks / first / 1e9)
    return out[0], out[1]


if __name__ == "__main__":
    main()
