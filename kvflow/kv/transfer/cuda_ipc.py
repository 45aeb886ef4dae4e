"""The "cuda_ipc" transfer backend: same-host GPU KV, copied device to device.

The holder publishes its cache tensor's CUDA IPC handle once (`torch`'s
`UntypedStorage._share_cuda_()`: plain bytes and ints, no pickle); a puller on the same
host opens it once per peer and copies each run with `tensor.copy_` on its own device
(peer-to-peer over NVLink/PCIe, or within one GPU when both processes share it).
Tensor parallel: a TP=N holder publishes every rank's handle (`AgentInfo.cuda_ipc_shards`,
each rank's cache on its own GPU), and a TP=M puller's rank 0 has its other ranks' caches
opened the same way (kvflow.engines.native.tp_ranks); the copies then re-slice KV heads
from every holder GPU into every puller GPU (kvflow.kv.heads.copy_run_heads_tensors).
torch is imported only here, and only by workers whose KV is on a GPU.
Needs a GPU to run; its tests are marked `gpu`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec

from kvflow.kv.blocks import KvBlockIO
from kvflow.kv.heads import copy_run_heads_tensors
from kvflow.kv.layout import KvLayout

if TYPE_CHECKING:
    from kvflow.kv.transfer.backends import PullJob
    from kvflow.kv.transfer.messages import AgentInfo


class CudaIpcBackend:
    name = "cuda_ipc"

    def __init__(self) -> None:
        self._opened: dict[int, list[Any]] = {}  # worker id -> the peer's cache tensors, here

    def publish(self, info: AgentInfo, io: KvBlockIO) -> AgentInfo | None:
        tensor = io.device_tensor()
        if tensor is None or tensor.device.type != "cuda":
            return None
        if len(info.cuda_ipc_shards) != info.shards - 1:
            return None  # a rank's cache has no handle: peers would get part of the heads
        return msgspec.structs.replace(info, cuda_ipc=share_handle(tensor))

    def usable(self, local: AgentInfo, remote: AgentInfo) -> bool:
        return (remote.cuda_ipc is not None and local.cuda_ipc is not None
                and remote.host_id == local.host_id)

    async def pull(self, job: PullJob) -> int:
        dst = [io.device_tensor() for io in job.destinations]
        remote = job.remote
        assert all(t is not None for t in dst) and remote.cuda_ipc is not None
        src = self._open(remote.worker_id, [remote.cuda_ipc, *remote.cuda_ipc_shards],
                         remote.layout)
        return await asyncio.to_thread(copy_runs, src, dst, job.runs)

    def _open(self, worker_id: int, handles: list[list], layout: KvLayout) -> list[Any]:
        tensors = self._opened.get(worker_id)
        if tensors is None:
            tensors = self._opened[worker_id] = [open_handle(h, layout) for h in handles]
        return tensors


def share_handle(tensor: Any) -> list[bytes | int]:
    """A CUDA tensor's storage as an IPC handle of plain values (msgpack-able, no pickle)."""
    return [_plain(x) for x in tensor.untyped_storage()._share_cuda_()]


def open_handle(handle: list, layout: KvLayout, device: Any = None) -> Any:
    """The peer's whole cache `[layer, 2, slot, token, head, dim]`, mapped into this process
    on the GPU it lives on (`device`, if given, must be that GPU)."""
    import torch

    *fields, event_sync_required = handle
    storage = torch.UntypedStorage._new_shared_cuda(*fields, bool(event_sync_required))
    if device is not None and torch.device(device) != storage.device:
        raise ValueError(f"the CUDA IPC handle is for {storage.device}, not {device}")
    dtype = getattr(torch, layout.dtype)
    flat = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    shape = (layout.num_layers, 2, layout.num_slots, layout.block_size, layout.num_kv_heads,
             layout.head_dim)
    return flat.view(dtype).view(shape)


def copy_runs(src: list[Any], dst: list[Any], runs: list) -> int:
    """Copy `runs` from the holder's rank caches `src` into ours `dst` (any GPUs), heads
    re-sliced when the splits differ; returns when every copy is done on every GPU.
    (Plain torch: CPU tensors work too, which is how it is tested without a GPU.)"""
    import torch

    if len(src) == 1 and len(dst) == 1:
        for run in runs:
            dst[0][:, :, run.dst : run.dst + run.count].copy_(
                src[0][:, :, run.src : run.src + run.count], non_blocking=True)
        moved = sum(r.count for r in runs) * src[0][:, :, :1].numel() * src[0].element_size()
    else:
        moved = sum(copy_run_heads_tensors(src, dst, run) for run in runs)
    for device in {t.device for t in [*src, *dst]}:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return moved


def _plain(value: Any) -> bytes | int:
    """The handle's fields (bytes, ints, one bool) as AgentInfo.cuda_ipc carries them."""
    return value if isinstance(value, bytes) else int(value)
