"""The native engine's KV cache as a `KvBlockIO`: its layout descriptor and block reads/writes.

The cache is one tensor `[layer, 2, slot, token, head, dim]` (kv_cache.py), so a run of
blocks is `cache[:, :, start:start+n]`, exactly the wire order of kvflow.kv.layout.
On CPU the cache may live in a `SharedRegion` (/dev/shm) that same-host peers map and
copy from directly; block reads/writes then go through `RegionBlockIO`. On a GPU,
`TensorBlockIO` stages runs through host memory.
"""

from __future__ import annotations

import torch

from kvflow.engines.native.kv_cache import KvCacheLayout
from kvflow.kv.blocks import KvBlockIO, RegionBlockIO
from kvflow.kv.layout import KvLayout


def kv_layout(layout: KvCacheLayout, device: torch.device) -> KvLayout:
    return KvLayout(
        num_layers=layout.num_layers,
        block_size=layout.block_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=str(layout.dtype).removeprefix("torch."),
        device=str(device),
        num_slots=layout.num_blocks + 1,
    )


class TensorBlockIO:
    """KvBlockIO over a device tensor: runs are copied through host memory."""

    def __init__(self, layout: KvLayout, whole: torch.Tensor) -> None:
        self.layout = layout
        self.whole = whole

    def region(self) -> memoryview | None:
        return None

    def device_tensor(self) -> torch.Tensor:
        return self.whole

    def read_run(self, start: int, count: int) -> bytes:
        part = self.whole[:, :, start : start + count].contiguous().cpu()
        return part.view(torch.uint8).numpy().tobytes()

    def write_run(self, start: int, count: int, data: bytes | memoryview) -> None:
        target = self.whole[:, :, start : start + count]
        host = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        target.copy_(host.view(self.whole.dtype).view(target.shape), non_blocking=False)


def block_io(layout: KvLayout, whole: torch.Tensor) -> KvBlockIO:
    """RegionBlockIO for a CPU cache (zero-copy view of its memory), else TensorBlockIO."""
    if whole.device.type != "cpu":
        return TensorBlockIO(layout, whole)
    flat = whole.view(-1).view(torch.uint8)  # type: ignore[arg-type]
    return RegionBlockIO(layout, memoryview(flat.numpy()))
