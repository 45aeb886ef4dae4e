"""The "cuda_ipc" transfer backend: same-host GPU KV, copied device to device.

The holder publishes its cache tensor's CUDA IPC handle once (`torch`'s
`UntypedStorage._share_cuda_()`: plain bytes and ints, no pickle); a puller on the same
host opens it once per peer and copies each run with `tensor.copy_` on its own device
(peer-to-peer over NVLink/PCIe, or within one GPU when both processes share it).
torch is imported only here, and only by workers whose KV is on a GPU.
Needs a GPU to run; its tests are marked `gpu`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec

from kvflow.kv.blocks import KvBlockIO
from kvflow.kv.layout import KvLayout

if TYPE_CHECKING:
    from kvflow.kv.transfer.backends import PullJob
    from kvflow.kv.transfer.messages import AgentInfo


class CudaIpcBackend:
    name = "cuda_ipc"

    def __init__(self) -> None:
        self._opened: dict[int, Any] = {}  # worker id -> the peer's cache tensor, here

    def publish(self, info: AgentInfo, io: KvBlockIO) -> AgentInfo | None:
        tensor = io.device_tensor()
        if tensor is None or tensor.device.type != "cuda":
            return None
        handle = [_plain(x) for x in tensor.untyped_storage()._share_cuda_()]
        return msgspec.structs.replace(info, cuda_ipc=handle)

    def usable(self, local: AgentInfo, remote: AgentInfo) -> bool:
        return (remote.cuda_ipc is not None and local.cuda_ipc is not None
                and remote.host_id == local.host_id)

    async def pull(self, job: PullJob) -> int:
        dst = job.local_io.device_tensor()
        assert dst is not None and job.remote.cuda_ipc is not None
        src = self._open(job.remote.worker_id, job.remote.cuda_ipc, job.remote.layout, dst.device)
        return await asyncio.to_thread(_copy_runs, src, dst, job)

    def _open(self, worker_id: int, handle: list, layout: KvLayout, device: Any) -> Any:
        tensor = self._opened.get(worker_id)
        if tensor is None:
            tensor = self._opened[worker_id] = open_handle(handle, layout, device)
        return tensor


def open_handle(handle: list, layout: KvLayout, device: Any) -> Any:
    """The peer's whole cache `[layer, 2, slot, token, head, dim]`, mapped into this process."""
    import torch

    *fields, event_sync_required = handle
    storage = torch.UntypedStorage._new_shared_cuda(*fields, bool(event_sync_required))
    dtype = getattr(torch, layout.dtype)
    flat = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
    shape = (layout.num_layers, 2, layout.num_slots, layout.block_size, layout.num_kv_heads,
             layout.head_dim)
    return flat.view(dtype).view(shape)


def _copy_runs(src: Any, dst: Any, job: PullJob) -> int:
    import torch

    with torch.cuda.device(dst.device):
        for run in job.runs:
            dst[:, :, run.dst : run.dst + run.count].copy_(
                src[:, :, run.src : run.src + run.count], non_blocking=True)
        torch.cuda.current_stream().synchronize()
    return sum(r.count for r in job.runs) * job.remote.layout.block_bytes


def _plain(value: Any) -> bytes | int:
    """The handle's fields (bytes, ints, one bool) as AgentInfo.cuda_ipc carries them."""
    return value if isinstance(value, bytes) else int(value)
