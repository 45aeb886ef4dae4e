"""Transfer agents between engines of different tensor-parallel sizes (no model): every rank's
KV heads move, re-sliced, over shm and tcp, in both directions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest

from kvflow.kv.blocks import RegionBlockIO
from kvflow.kv.connector import KvShard
from kvflow.kv.layout import KvLayout, KvLayoutMismatch
from kvflow.kv.shm import SharedRegion
from kvflow.kv.transfer.agent import TransferAgent, TransferConfig, TransferFailed
from kvflow.runtime import DistributedRuntime, RuntimeConfig
from kvflow.testing.kv_shards import head_shards

LAYERS, SLOTS, BS, HEADS, DIM = 2, 8, 4, 4, 8


def _layout(heads: int) -> KvLayout:
    return KvLayout(num_layers=LAYERS, block_size=BS, num_kv_heads=heads, head_dim=DIM,
                    dtype="float32", num_slots=SLOTS)


@dataclass
class Ranks:
    """A TP=n engine's KV: one /dev/shm region per rank, as its rank processes create them;
    `attached` are ranks 1..n-1 mapped writable in rank 0's process (what tp_ranks does)."""

    regions: list[SharedRegion]
    attached: list[SharedRegion]

    @classmethod
    def make(cls, full: np.ndarray, n: int) -> Ranks:
        regions = head_shards(full, n)
        return cls(regions, [SharedRegion.attach(r.name, writable=True) for r in regions[1:]])

    def io(self) -> RegionBlockIO:
        return RegionBlockIO(_layout(HEADS // len(self.regions)), self.regions[0].view)

    def shards(self, publish_shm: bool = True) -> tuple[KvShard, ...]:
        layout = _layout(HEADS // len(self.regions))
        return tuple(KvShard(RegionBlockIO(layout, a.view), shm_name=a.name if publish_shm else None)
                     for a in self.attached)

    def gather(self) -> np.ndarray:
        n = len(self.regions)
        parts = [np.frombuffer(r.view, dtype=np.float32).reshape(2 * LAYERS, SLOTS, BS, HEADS // n, DIM)
                 for r in self.regions]
        return np.concatenate(parts, axis=3)

    def close(self) -> None:
        for region in [*self.attached, *self.regions]:
            region.close()


def _full(seed: int) -> np.ndarray:
    """All KV heads of one engine: [slab, slot, token, head, dim]."""
    return np.random.default_rng(seed).standard_normal((2 * LAYERS, SLOTS, BS, HEADS, DIM),
                                                       dtype=np.float32)


@pytest.fixture
async def runtime() -> AsyncIterator[DistributedRuntime]:
    rt = await DistributedRuntime(RuntimeConfig(
        namespace="kvtp", discovery="memory", event_plane="inproc")).start()
    yield rt
    await rt.shutdown()


async def _agents(runtime: DistributedRuntime, holder: Ranks, puller: Ranks, backends: tuple[str, ...],
                  publish_shm: bool = True) -> list[TransferAgent]:
    config = TransferConfig(timeout_s=5.0, backends=backends, chunk_bytes=1)  # a chunk per block
    agents = []
    for worker_id, component, ranks in ((11, "prefill", holder), (22, "backend", puller)):
        agent = TransferAgent(runtime, component, worker_id, ranks.io(), lambda blocks: None,
                              shm_name=ranks.regions[0].name if publish_shm else None, config=config,
                              head_shards=ranks.shards(publish_shm))
        await agent.start()
        agents.append(agent)
    return agents


@pytest.mark.parametrize("backend", ["shm", "tcp"])
@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 2), (2, 2), (4, 2), (1, 1)])
async def test_pull_reslices_every_ranks_heads(runtime: DistributedRuntime, backend: str,
                                               src_tp: int, dst_tp: int) -> None:
    full = _full(seed=10 * src_tp + dst_tp)
    holder, puller = Ranks.make(full, src_tp), Ranks.make(np.zeros_like(full), dst_tp)
    agents = await _agents(runtime, holder, puller, (backend,))
    try:
        assert agents[0].info.shards == src_tp and backend in agents[0].info.backends
        agents[0].holds.add("t1", [1, 2, 3, 6], 16)
        stats = await agents[1].pull(11, "t1", 1, [4, 5, 0])  # the hold's blocks 2, 3, 6
        assert stats.backend == backend and stats.blocks == 3
        assert stats.bytes == full[:, :3].nbytes  # every head of 3 blocks, once
        want = np.zeros_like(full)
        want[:, [4, 5, 0]] = full[:, [2, 3, 6]]
        np.testing.assert_array_equal(puller.gather(), want)
        assert len(agents[0].holds) == 0  # released: the copy is valid
    finally:
        for agent in agents:
            await agent.close()
        holder.close()
        puller.close()


async def test_a_holder_without_every_ranks_region_serves_tcp_only(runtime: DistributedRuntime) -> None:
    """No /dev/shm names (e.g. GPU ranks without CUDA IPC): shm would miss heads, so only
    tcp (which reads each rank's memory in the holder's process) is published."""
    full = _full(seed=3)
    holder, puller = Ranks.make(full, 2), Ranks.make(np.zeros_like(full), 2)
    agents = await _agents(runtime, holder, puller, ("cuda_ipc", "shm", "tcp"), publish_shm=False)
    try:
        assert agents[0].info.backends == ["tcp"] and agents[0].info.head_shards == []
        agents[0].holds.add("t2", [0, 1], 8)
        stats = await agents[1].pull(11, "t2", 0, [6, 7])
        assert stats.backend == "tcp"
        np.testing.assert_array_equal(puller.gather()[:, 6:8], full[:, 0:2])
    finally:
        for agent in agents:
            await agent.close()
        holder.close()
        puller.close()


async def test_engines_of_different_models_are_refused_by_total_heads(
    runtime: DistributedRuntime,
) -> None:
    """2 ranks x 2 heads here vs 1 rank x 2 heads there: 4 vs 2 KV heads, not the same model."""
    holder = Ranks.make(_full(seed=4)[:, :, :, :2], 1)
    holder_layout = _layout(2)
    puller = Ranks.make(np.zeros_like(_full(seed=4)), 2)
    config = TransferConfig(timeout_s=5.0, backends=("tcp",))
    agents = [TransferAgent(runtime, "prefill", 11, RegionBlockIO(holder_layout, holder.regions[0].view),
                            lambda blocks: None, config=config),
              TransferAgent(runtime, "backend", 22, puller.io(), lambda blocks: None, config=config,
                            head_shards=puller.shards())]
    for agent in agents:
        await agent.start()
    try:
        agents[0].holds.add("t3", [0], 4)
        with pytest.raises(TransferFailed, match="num_kv_heads: this worker 4 vs peer 2") as info:
            await agents[1].pull(11, "t3", 0, [1])
        assert isinstance(info.value.__cause__, KvLayoutMismatch)
    finally:
        for agent in agents:
            await agent.close()
        holder.close()
        puller.close()


def _devices() -> list[str]:
    """Where the GPU variant puts rank r: cuda:r when there are GPUs enough, else cuda:0."""
    import torch

    return [f"cuda:{r}" if torch.cuda.device_count() > r else "cuda:0" for r in range(4)]


@pytest.mark.parametrize("gpu", [False, pytest.param(True, marks=pytest.mark.gpu)])
@pytest.mark.parametrize(("src_tp", "dst_tp"), [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)])
def test_cuda_ipc_copy_runs_reslices_between_rank_caches(gpu: bool, src_tp: int, dst_tp: int) -> None:
    """The cuda_ipc backend's copy on cache tensors `[layer, 2, slot, token, head, dim]`:
    plain torch on CPU tensors here; on GPUs (marked gpu) each rank's cache on its own GPU."""
    torch = pytest.importorskip("torch")
    from kvflow.kv.blocks import BlockRun
    from kvflow.kv.transfer.cuda_ipc import copy_runs

    devices = _devices() if gpu else ["cpu"] * 4
    full = torch.randn(LAYERS, 2, SLOTS, BS, HEADS, DIM)
    src = [t.contiguous().to(devices[r]) for r, t in enumerate(full.chunk(src_tp, dim=4))]
    dst = [torch.zeros_like(t).to(devices[r]) for r, t in enumerate(full.chunk(dst_tp, dim=4))]
    runs = [BlockRun(src=0, dst=5, count=2), BlockRun(src=4, dst=1, count=1)]
    moved = copy_runs(src, dst, runs)
    want = torch.zeros_like(full)
    want[:, :, 5:7], want[:, :, 1] = full[:, :, 0:2], full[:, :, 4]
    assert torch.equal(torch.cat([t.cpu() for t in dst], dim=4), want)
    assert moved == full[:, :, :3].numel() * 4


async def test_cuda_ipc_pull_opens_every_holder_rank_and_writes_every_local_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The backend's plumbing without a GPU: the holder's handles (rank 0's, then
    `cuda_ipc_shards`) are opened in rank order and the copy fills every local rank's cache."""
    torch = pytest.importorskip("torch")
    from kvflow.kv.blocks import BlockRun
    from kvflow.kv.transfer import cuda_ipc
    from kvflow.kv.transfer.backends import PullJob
    from kvflow.kv.transfer.messages import AgentInfo

    full = torch.randn(LAYERS, 2, SLOTS, BS, HEADS, DIM)
    holder = {f"h{r}".encode(): t.contiguous() for r, t in enumerate(full.chunk(2, dim=4))}
    opened: list[bytes] = []

    def fake_open(handle: list, layout: KvLayout, device: object = None) -> object:
        opened.append(handle[0])
        assert layout.num_kv_heads == HEADS // 2
        return holder[handle[0]]

    monkeypatch.setattr(cuda_ipc, "open_handle", fake_open)

    class CacheIO:  # a KvBlockIO whose memory is a cache tensor (as TensorBlockIO)
        def __init__(self, tensor: object) -> None:
            self.tensor = tensor

        def device_tensor(self) -> object:
            return self.tensor

    local = [torch.zeros_like(full)]  # a TP=1 puller
    remote = AgentInfo(11, "ns.prefill.kv_transfer", _layout(HEADS // 2), "host", ["cuda_ipc"],
                       cuda_ipc=[b"h0", 0], shards=2, cuda_ipc_shards=[[b"h1", 0]])
    me = AgentInfo(22, "ns.backend.kv_transfer", _layout(HEADS), "host", ["cuda_ipc"], cuda_ipc=[b"me"])
    backend = cuda_ipc.CudaIpcBackend()
    assert backend.usable(me, remote)
    job = PullJob(CacheIO(local[0]), me, remote, "t", [BlockRun(2, 0, 3)], call=None,  # type: ignore[arg-type]
                  local_shards=[CacheIO(local[0])])  # type: ignore[list-item]
    assert await backend.pull(job) == full[:, :, :3].numel() * 4
    assert opened == [b"h0", b"h1"]
    assert torch.equal(local[0][:, :, 0:3], full[:, :, 2:5]) and not local[0][:, :, 3:].any()


@pytest.mark.parametrize("backend", ["shm", "tcp"])
@pytest.mark.parametrize("dst_tp", [1, 2])
async def test_pull_into_ranks_that_are_not_host_regions(runtime: DistributedRuntime, backend: str,
                                                         dst_tp: int) -> None:
    """A puller whose ranks' KV are cache tensors (as on GPUs: `TensorBlockIO`, no host region):
    shm stages each holder rank's run and re-cuts it, tcp writes the re-cut runs."""
    torch = pytest.importorskip("torch")
    from kvflow.engines.native.kv_io import TensorBlockIO

    full = _full(seed=9)
    holder = Ranks.make(full, 2)
    caches = [torch.zeros(LAYERS, 2, SLOTS, BS, HEADS // dst_tp, DIM) for _ in range(dst_tp)]
    ios = [TensorBlockIO(_layout(HEADS // dst_tp), c) for c in caches]
    config = TransferConfig(timeout_s=5.0, backends=(backend,))
    agents = [TransferAgent(runtime, "prefill", 11, holder.io(), lambda blocks: None,
                            shm_name=holder.regions[0].name, config=config, head_shards=holder.shards()),
              TransferAgent(runtime, "backend", 22, ios[0], lambda blocks: None, config=config,
                            head_shards=tuple(KvShard(io) for io in ios[1:]))]
    for agent in agents:
        await agent.start()
    try:
        agents[0].holds.add("t4", [3, 4], 8)
        stats = await agents[1].pull(11, "t4", 0, [0, 1])
        assert stats.backend == backend and stats.bytes == full[:, 3:5].nbytes
        got = torch.cat(caches, dim=4).flatten(0, 1).numpy()  # [slab, slot, token, head, dim]
        np.testing.assert_array_equal(got[:, 0:2], full[:, 3:5])
        assert not got[:, 2:].any()
    finally:
        for agent in agents:
            await agent.close()
        holder.close()
