"""BlockMover: batched copies between an engine's KV cache (G1) and rows of a host tensor (G2).

The KV cache is viewed as bytes `[slab, slot, slab_block_bytes]` (kvflow.kv.layout: one
slab per layer and k|v), a host tensor as `[row, block_bytes]` with each row one block in
wire order. Both directions move a whole run of blocks with a fixed number of tensor ops,
never one copy per block:

- G1 -> host (`to_host`): one `index_select` of the blocks out of the cache, one transpose
  to wire order, then one device-to-host copy per run of consecutive destination rows
  (one in the common case: a batch is given consecutive slots), or, when the rows are
  scattered, one copy into a staging buffer and one `index_copy_` on the host.
- host -> G1 (`to_device`): one host-to-device copy per run of consecutive source rows
  (or one `index_select` into a staging buffer and one copy, when they are scattered),
  then one `index_copy_` into the cache for all layers at once.

On CUDA the copies run on a side stream, ordered after the work queued on the engine's
stream (for reads of blocks it computes, and so that a load never races a step in flight
that still writes into a block freed and reused for it), in chunks of at most
`CHUNK_BYTES`; pinned host memory makes them asynchronous, and the call returns once the
side stream's event has completed, so a caller that reports the load afterwards never
exposes half-written blocks. On CPU the same code runs with plain
tensors (no streams, no pinning). Callers serialise calls per cache (the tier
connector's lock), since the staging buffer is shared.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from kvflow.kv.blocks import KvBlockIO

CHUNK_BYTES = 256 << 20  # one chunk of a long run on the GPU (bounds device staging)
SCATTERED = 8  # more source/destination runs than this (and than n/16): stage on the host


def cache_bytes_view(io: KvBlockIO) -> torch.Tensor:
    """The engine's whole KV memory as a uint8 tensor `[slab, slot, slab_block_bytes]`."""
    layout = io.layout
    shape = (layout.num_slabs, layout.num_slots, layout.slab_block_bytes)
    whole = io.device_tensor()
    if whole is not None:
        flat = whole.reshape(-1)
        return flat.view(torch.uint8).view(shape)
    region = io.region()
    if region is None:
        raise ValueError("this KV cache exposes neither a tensor nor a host region")
    flat = torch.frombuffer(region, dtype=torch.uint8, count=layout.region_bytes)
    return flat.view(shape)


def host_tensor(rows: int, row_bytes: int, *, pin: bool) -> torch.Tensor:
    """A `[rows, row_bytes]` uint8 host tensor, page-locked when `pin` (CUDA engines)."""
    return torch.empty((rows, row_bytes), dtype=torch.uint8, pin_memory=pin)


def runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """`(first_row, offset, count)` for each run of consecutive values in sorted `rows`."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(rows)]))
    return [(int(rows[s]), int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class BlockMover:
    """Copies runs of blocks between one KV cache and host tensors (see the module doc)."""

    def __init__(self, io: KvBlockIO) -> None:
        self.cache = cache_bytes_view(io)
        self.device = self.cache.device
        self.cuda = self.device.type == "cuda"
        layout = io.layout
        self.num_slabs = layout.num_slabs
        self.slab_block_bytes = layout.slab_block_bytes
        self.block_bytes = layout.block_bytes
        self.chunk_blocks = max(1, CHUNK_BYTES // self.block_bytes)
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._staging: torch.Tensor | None = None
        self._lock = threading.Lock()

    @property
    def pinned(self) -> bool:
        """Host tensors for this cache should be page-locked (the cache is on a GPU)."""
        return self.cuda

    def _stage(self, n: int) -> torch.Tensor:
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = host_tensor(min(self.chunk_blocks, max(n, 1)), self.block_bytes,
                                        pin=self.cuda)
        return self._staging[:n]

    def _index(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(self.device)

    def _scattered(self, pieces: list[tuple[int, int, int]], n: int) -> bool:
        return len(pieces) > max(SCATTERED, n // 16)

    def _chunks(self, block_ids: Sequence[int], rows: Sequence[int]
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        ids = np.asarray(block_ids, dtype=np.int64)
        rws = np.asarray(rows, dtype=np.int64)
        if ids.shape != rws.shape:
            raise ValueError(f"{len(ids)} blocks for {len(rws)} host rows")
        order = np.argsort(rws, kind="stable")
        ids, rws = ids[order], rws[order]
        step = self.chunk_blocks
        return [(ids[i : i + step], rws[i : i + step]) for i in range(0, len(ids), step)]

    # ---- G1 -> host -------------------------------------------------------------------

    def to_host(self, block_ids: Sequence[int], dst: torch.Tensor, rows: Sequence[int]) -> None:
        """Copy cache blocks `block_ids[i]` into `dst[rows[i]]` (wire order), then return."""
        with self._lock:
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    self._to_host(block_ids, dst, rows)
                self._stream.synchronize()
            else:
                self._to_host(block_ids, dst, rows)

    def _to_host(self, block_ids: Sequence[int], dst: torch.Tensor, rows: Sequence[int]) -> None:
        for ids, rws in self._chunks(block_ids, rows):
            n = len(ids)
            picked = self.cache.index_select(1, self._index(ids))  # [slab, n, bytes]
            blocks = picked.transpose(0, 1).reshape(n, self.block_bytes)  # wire order
            pieces = runs(rws)
            if self._scattered(pieces, n):
                stage = self._stage(n)
                stage.copy_(blocks, non_blocking=self.cuda)
                if self._stream is not None:
                    self._stream.synchronize()
                dst.index_copy_(0, torch.from_numpy(rws), stage)
                continue
            for first, offset, count in pieces:
                dst[first : first + count].copy_(blocks[offset : offset + count],
                                                 non_blocking=self.cuda)

    # ---- host -> G1 -------------------------------------------------------------------

    def to_device(self, block_ids: Sequence[int], src: torch.Tensor, rows: Sequence[int]) -> None:
        """Copy `src[rows[i]]` (wire order) into cache block `block_ids[i]`, then return."""
        with self._lock:
            if self._stream is not None:
                # After the engine's queued steps: with async output a step in flight may
                # still write into a block that the step before freed and a load now fills.
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    self._to_device(block_ids, src, rows)
                self._stream.synchronize()
            else:
                self._to_device(block_ids, src, rows)

    def _to_device(self, block_ids: Sequence[int], src: torch.Tensor, rows: Sequence[int]) -> None:
        for ids, rws in self._chunks(block_ids, rows):
            n = len(ids)
            pieces = runs(rws)
            if len(pieces) == 1 and not self.cuda:
                first = pieces[0][0]
                staged = src[first : first + n]  # a view: the CPU cache copies from it directly
            elif self._scattered(pieces, n):
                if self._stream is not None:
                    self._stream.synchronize()  # the previous chunk no longer reads the stage
                host = self._stage(n)
                torch.index_select(src, 0, torch.from_numpy(rws), out=host)
                staged = host.to(self.device, non_blocking=True) if self.cuda else host
            else:
                staged = torch.empty((n, self.block_bytes), dtype=torch.uint8, device=self.device)
                for first, offset, count in pieces:
                    staged[offset : offset + count].copy_(src[first : first + count],
                                                          non_blocking=self.cuda)
            blocks = staged.view(n, self.num_slabs, self.slab_block_bytes).transpose(0, 1)
            self.cache.index_copy_(1, self._index(ids), blocks)
