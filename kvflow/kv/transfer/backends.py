"""Transfer backends by name: how blocks cross from a holding agent to a pulling one.

- "shm": same host, KV in host memory: the puller maps the holder's /dev/shm region
  (published once) and copies runs straight out of it. No bytes on any socket.
- "tcp": anywhere: the holder streams the runs as chunks over the request plane.
  The fallback; used between GPUs it logs a warning and counts a metric (agent.py).
- "cuda_ipc": same host, KV on GPUs: device-to-device copies out of the holder's cache
  tensor, opened once from its published CUDA IPC handle (cuda_ipc.py).

A backend pulls a `PullJob`: runs (src on the holder, dst here) that the agent already
merged and validated against the hold; it returns the bytes it moved. Either engine may be
tensor parallel (`AgentInfo.shards` memories on the holder, `PullJob.local_shards` here):
every backend then moves every rank's heads, re-sliced to this engine's split
(kvflow.kv.heads); with one memory on both sides that is the plain block copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from kvflow.kv.blocks import BlockRun, KvBlockIO, copy_run, read_run_from
from kvflow.kv.heads import copy_run_heads, reslice_wire
from kvflow.kv.shm import SharedRegion
from kvflow.kv.transfer.cuda_ipc import CudaIpcBackend
from kvflow.kv.transfer.messages import AgentInfo, Chunk, Reply, TransferRequest
from kvflow.runtime.plugins import PluginRegistry


@dataclass
class PullJob:
    local_io: KvBlockIO
    local: AgentInfo
    remote: AgentInfo
    transfer_id: str
    runs: list[BlockRun]
    call: Callable[[TransferRequest], AsyncIterator[Reply]]  # a request to the holder's agent
    # Every rank's KV memory here, rank 0's (`local_io`) first; empty means just `local_io`.
    local_shards: list[KvBlockIO] = field(default_factory=list)

    @property
    def destinations(self) -> list[KvBlockIO]:
        return self.local_shards or [self.local_io]


def write_shards(job: PullJob, dst: int, count: int, parts: list[bytes | memoryview]) -> None:
    """Write one run of every holder rank (`parts`, wire order) into this engine's ranks."""
    dests = job.destinations
    if len(parts) == len(dests):  # the same split: rank r's heads go to rank r
        for io, part in zip(dests, parts, strict=True):
            io.write_run(dst, count, part)
        return
    for io, wire in zip(dests, reslice_wire(job.remote.layout, parts, count, len(dests)), strict=True):
        io.write_run(dst, count, wire.data)


class TransferBackend(Protocol):
    name: str

    def publish(self, info: AgentInfo, io: KvBlockIO) -> AgentInfo | None:
        """`info` plus what peers need to pull with this backend; None if it cannot serve."""
        ...

    def usable(self, local: AgentInfo, remote: AgentInfo) -> bool:
        """Whether this agent can pull from `remote` with it."""
        ...

    async def pull(self, job: PullJob) -> int: ...


BACKENDS: PluginRegistry[TransferBackend] = PluginRegistry(
    "KV transfer backend", "kvflow.kv_transfer_backends")


def register_backend(backend: TransferBackend) -> TransferBackend:
    return BACKENDS.add(backend.name, backend)


def backend_names() -> list[str]:
    return BACKENDS.names()


def get_backend(name: str) -> TransferBackend:
    return BACKENDS.get(name)


def choose_backend(preference: tuple[str, ...], local: AgentInfo, remote: AgentInfo) -> str:
    """The first backend in `preference` both agents support."""
    for name in preference:
        backend = BACKENDS.find(name)
        if backend is not None and name in remote.backends and backend.usable(local, remote):
            return name
    raise LookupError(
        f"no KV transfer backend in common with worker {remote.worker_id:x} "
        f"(it serves {remote.backends}; this worker tries {list(preference)})"
    )


class TcpBackend:
    """Runs streamed as chunks over the request plane (works between any two hosts)."""

    name = "tcp"

    def publish(self, info: AgentInfo, io: KvBlockIO) -> AgentInfo | None:
        return info

    def usable(self, local: AgentInfo, remote: AgentInfo) -> bool:
        return True

    async def pull(self, job: PullJob) -> int:
        request = TransferRequest("read", job.transfer_id, [(r.src, r.count) for r in job.runs])
        pending = list(job.runs)
        parts: list[bytes] = []  # one position's chunks so far, holder rank order
        moved = 0
        async for reply in job.call(request):
            if not isinstance(reply, Chunk):
                raise ValueError(f"unexpected transfer reply {type(reply).__name__}")
            if not pending:
                raise ValueError(f"chunk for block {reply.src} after every run arrived")
            run = pending[0]
            if not run.src <= reply.src < run.src + run.count:
                raise ValueError(f"chunk for block {reply.src} outside the run {run}")
            if reply.shard != len(parts):
                raise ValueError(f"chunk of rank {reply.shard} where rank {len(parts)} was due")
            parts.append(reply.data)
            moved += len(reply.data)
            if len(parts) < job.remote.shards:
                continue
            write_shards(job, run.dst + (reply.src - run.src), reply.count, list(parts))
            parts.clear()
            if reply.src + reply.count == run.src + run.count:
                pending.pop(0)
        if pending:
            raise ValueError(f"the holder ended the stream with {len(pending)} runs unsent")
        return moved


class ShmBackend:
    """Copies runs out of the holder's /dev/shm region (same host, host-memory KV)."""

    name = "shm"

    def __init__(self) -> None:
        self._attached: dict[str, SharedRegion] = {}

    def publish(self, info: AgentInfo, io: KvBlockIO) -> AgentInfo | None:
        every_rank = len(info.head_shards) == info.shards - 1
        return info if info.shm_name is not None and every_rank else None

    def usable(self, local: AgentInfo, remote: AgentInfo) -> bool:
        return remote.shm_name is not None and remote.host_id == local.host_id

    async def pull(self, job: PullJob) -> int:
        assert job.remote.shm_name is not None
        if job.remote.shards > 1 or len(job.destinations) > 1:
            return await asyncio.to_thread(self._copy_shards, job)
        region = self._attach(job.remote.shm_name)
        return await asyncio.to_thread(self._copy, job, region.view)

    def _attach(self, name: str) -> SharedRegion:
        region = self._attached.get(name)
        if region is None:
            region = self._attached[name] = SharedRegion.attach(name)
        return region

    def _copy_shards(self, job: PullJob) -> int:
        """Tensor parallel on either side: every holder rank's region, heads re-sliced into
        every rank's memory here (strided copies between regions; staged when ours are not
        host memory)."""
        rl = job.remote.layout
        assert job.remote.shm_name is not None
        names = [job.remote.shm_name, *job.remote.head_shards]
        src = [(rl, self._attach(name).view) for name in names]
        regions = [io.region() for io in job.destinations]
        if all(r is not None for r in regions):
            dst = [(io.layout, r) for io, r in zip(job.destinations, regions, strict=True)
                   if r is not None]
            return sum(copy_run_heads(src, dst, run) for run in job.runs)
        for run in job.runs:
            parts: list[bytes | memoryview] = [read_run_from(rl, view, run.src, run.count)
                                               for _, view in src]
            write_shards(job, run.dst, run.count, parts)
        return sum(r.count for r in job.runs) * rl.block_bytes * len(names)

    @staticmethod
    def _copy(job: PullJob, src: memoryview) -> int:
        rl, dst_region = job.remote.layout, job.local_io.region()
        for run in job.runs:
            if dst_region is not None:
                copy_run(rl, src, job.local_io.layout, dst_region, run)
            else:
                job.local_io.write_run(run.dst, run.count, read_run_from(rl, src, run.src, run.count))
        return sum(r.count for r in job.runs) * rl.block_bytes


register_backend(TcpBackend())
register_backend(ShmBackend())
register_backend(CudaIpcBackend())
