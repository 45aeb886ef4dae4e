"""KV pulls between engines of different tensor-parallel sizes on CPU: GB/s per backend and split.

    PYTHONPATH=. python bench/kv_reslice_cpu.py [--tokens 1024] [--reps 5]

Two transfer agents in one process (memory discovery, in-process request plane), each
engine's KV one /dev/shm region per rank exactly as a TP engine's rank 0 sees it
(kvflow.kv.transfer: the real `TransferAgent.pull`, describe to release). An 8B-shape
prompt (32 layers x 8 KV heads x 128 dims, bf16 bytes) is pulled over `shm` and `tcp`
for TP 1->1 (the baseline of each backend: no re-slicing), 2->1, 1->2 and 2->2; each is
printed as GB/s of KV and as a ratio against its backend's 1->1 in the same run, and
against a numpy copy of the same bytes (the memory floor). Every pull is checked
bit-exact. A 2-core shared dev box is noisy: compare figures of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

import numpy as np

from kvflow.kv.blocks import RegionBlockIO
from kvflow.kv.connector import KvShard
from kvflow.kv.layout import KvLayout
from kvflow.kv.shm import SharedRegion
from kvflow.kv.transfer.agent import TransferAgent, TransferConfig
from kvflow.runtime import DistributedRuntime, RuntimeConfig

LAYERS, HEADS, DIM, BLOCK = 32, 8, 128, 16


class Engine:
    """A TP=`tp` engine's KV: rank r's region holds heads r*H/tp.. (int16 = bf16 bytes)."""

    def __init__(self, slots: int, tp: int, fill: bool) -> None:
        self.tp = tp
        self.layout = KvLayout(num_layers=LAYERS, block_size=BLOCK, num_kv_heads=HEADS // tp,
                               head_dim=DIM, dtype="bfloat16", num_slots=slots)
        self.shape = (2 * LAYERS, slots, BLOCK, HEADS // tp, DIM)
        rng = np.random.default_rng(tp)
        self.regions = []
        for _ in range(tp):
            region = SharedRegion.create(self.layout.region_bytes)
            if fill:
                self.array(region)[:] = rng.integers(-30000, 30000, self.shape, dtype=np.int16)
            self.regions.append(region)
        self.attached = [SharedRegion.attach(r.name, writable=True) for r in self.regions[1:]]

    def array(self, region: SharedRegion) -> np.ndarray:
        return np.frombuffer(region.view, dtype=np.int16).reshape(self.shape)

    def whole(self) -> np.ndarray:
        return np.concatenate([self.array(r) for r in self.regions], axis=3)

    def agent(self, runtime: DistributedRuntime, worker_id: int, backend: str) -> TransferAgent:
        shards = tuple(KvShard(RegionBlockIO(self.layout, a.view), shm_name=a.name)
                       for a in self.attached)
        return TransferAgent(runtime, f"c{worker_id}", worker_id,
                             RegionBlockIO(self.layout, self.regions[0].view), lambda b: None,
                             shm_name=self.regions[0].name, head_shards=shards,
                             config=TransferConfig(timeout_s=120.0, backends=(backend,)))

    def close(self) -> None:
        for region in [*self.attached, *self.regions]:
            region.close()


async def pull_gbps(src_tp: int, dst_tp: int, backend: str, slots: int, reps: int) -> float:
    runtime = await DistributedRuntime(RuntimeConfig(
        namespace=f"b{src_tp}{dst_tp}{backend}", discovery="memory", event_plane="inproc")).start()
    holder, puller = Engine(slots, src_tp, True), Engine(slots, dst_tp, False)
    agents = [holder.agent(runtime, 1, backend), puller.agent(runtime, 2, backend)]
    try:
        for agent in agents:
            await agent.start()
        times = []
        blocks = list(range(slots))
        for rep in range(reps + 1):  # the first pull maps regions and warms up
            agents[0].holds.add(f"t{rep}", blocks, slots * BLOCK)
            t0 = time.perf_counter()
            stats = await agents[1].pull(1, f"t{rep}", 0, blocks)
            times.append(time.perf_counter() - t0)
            assert stats.backend == backend
        assert np.array_equal(puller.whole(), holder.whole()), (src_tp, dst_tp, backend)
        return slots * holder.layout.block_bytes * src_tp / statistics.median(times[1:]) / 1e9
    finally:
        for agent in agents:
            await agent.close()
        holder.close()
        puller.close()
        await runtime.shutdown()


def memcpy_gbps(nbytes: int, reps: int) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = src
    t0 = time.perf_counter()
    for _ in range(reps):
        dst[:] = src
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # each runtime's shutdown warns about its connections
    slots = args.tokens // BLOCK
    nbytes = slots * 2 * LAYERS * BLOCK * HEADS * DIM * 2
    floor = memcpy_gbps(nbytes, args.reps)
    print(f"KV of {args.tokens} tokens, 8B shape: {nbytes / 2**20:.0f} MiB; "
          f"numpy copy of the same bytes (floor): {floor:.2f} GB/s")
    for backend in ("shm", "tcp"):
        base = await pull_gbps(1, 1, backend, slots, args.reps)
        print(f"{backend:>3} TP=1 -> TP=1: {base:6.2f} GB/s ({base / floor:.0%} of the floor)")
        for src_tp, dst_tp in ((2, 1), (1, 2), (2, 2)):
            gbps = await pull_gbps(src_tp, dst_tp, backend, slots, args.reps)
            print(f"{backend:>3} TP={src_tp} -> TP={dst_tp}: {gbps:6.2f} GB/s "
                  f"({gbps / base:.2f}x of {backend} TP=1 -> TP=1, {gbps / floor:.0%} of the floor)")


if __name__ == "__main__":
    asyncio.run(main())
