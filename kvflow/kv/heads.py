"""Re-slicing KV heads between engines whose tensor-parallel ranks split the KV heads differently.

A TP=N engine keeps its KV as N memories, rank r holding KV heads `r*H/N .. (r+1)*H/N`
of every layer, each memory in the usual `kvflow.kv.layout` order (slab = layer x k|v,
then block, token, head, dim) with `num_kv_heads = H/N`. Moving a run of blocks from a
TP=N holder to a TP=M puller is then one strided copy per (source shard, destination
shard) pair whose head ranges overlap: `head_pieces` plans them, `copy_run_heads` does
them between host regions (shm: the puller maps every source shard and every local
shard), `reslice_wire` re-cuts one run received as wire bytes from every source shard
(tcp) into each destination shard's wire bytes, and `copy_run_heads_tensors` is the
same on torch cache tensors (GPU shards opened by CUDA IPC).
With N == M every piece is a whole shard and this is the plain block copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
import numpy as np

from kvflow.kv.blocks import BlockRun
from kvflow.kv.layout import KvLayout


class HeadSplit(NamedTuple):
    """`total_heads` KV heads split evenly over `shards` memories (tensor-parallel ranks)."""

    total_heads: int
    shards: int

    @property
    def per_shard(self) -> int:
        return self.total_heads // self.shards


class HeadPiece(NamedTuple):
    """`count` heads from `src_head` of source shard `src_shard` to `dst_head` of `dst_shard`."""

    src_shard: int
    src_head: int
    dst_shard: int
    dst_head: int
    count: int


class HeadSplitError(ValueError):
    """Two head splits cannot be mapped onto each other (different totals, uneven split)."""


def split_of(layouts: Sequence[KvLayout]) -> HeadSplit:
    """The split a list of per-rank layouts (rank order) describes; checks they are alike."""
    first = layouts[0]
    for other in layouts[1:]:
        if other.num_kv_heads != first.num_kv_heads or other.block_size != first.block_size:
            raise HeadSplitError(f"the ranks' KV layouts differ: {first} vs {other}")
    return HeadSplit(first.num_kv_heads * len(layouts), len(layouts))


def whole_layout(shard: KvLayout, shards: int) -> KvLayout:
    """The layout of all heads of `shards` memories shaped like `shard` (as one TP=1 engine)."""
    if shards == 1:
        return shard
    return msgspec.structs.replace(shard, num_kv_heads=shard.num_kv_heads * shards)


def head_pieces(src: HeadSplit, dst: HeadSplit) -> list[HeadPiece]:
    """The copies that move every head from its source shard to its destination shard."""
    for split in (src, dst):
        if split.shards < 1 or split.total_heads % split.shards:
            raise HeadSplitError(f"{split.total_heads} KV heads do not split over {split.shards}")
    if src.total_heads != dst.total_heads:
        raise HeadSplitError(
            f"the holder has {src.total_heads} KV heads, this worker {dst.total_heads}: "
            "prefill and decode workers must serve the same model"
        )
    pieces: list[HeadPiece] = []
    head = 0
    while head < src.total_heads:
        s_shard, s_off = divmod(head, src.per_shard)
        d_shard, d_off = divmod(head, dst.per_shard)
        count = min(src.per_shard - s_off, dst.per_shard - d_off)
        pieces.append(HeadPiece(s_shard, s_off, d_shard, d_off, count))
        head += count
    return pieces


def region_array(layout: KvLayout, region: memoryview) -> np.ndarray:
    """A shard's whole memory as bytes shaped [slab, slot, token, head, dim x element]."""
    shape = (layout.num_slabs, layout.num_slots, layout.block_size, layout.num_kv_heads,
             layout.head_dim * layout.element_size)
    flat = np.frombuffer(region, dtype=np.uint8, count=layout.region_bytes)
    return flat.reshape(shape)


def wire_array(layout: KvLayout, data: bytes | memoryview, count: int) -> np.ndarray:
    """A run of `count` blocks in wire order (`KvBlockIO.read_run`) with the same axes."""
    shape = (layout.num_slabs, count, layout.block_size, layout.num_kv_heads,
             layout.head_dim * layout.element_size)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _check_alike(src: KvLayout, dst: KvLayout) -> None:
    same = ("num_layers", "block_size", "head_dim", "dtype")
    bad = [f"{f}: holder {getattr(src, f)!r} vs here {getattr(dst, f)!r}"
           for f in same if getattr(src, f) != getattr(dst, f)]
    if bad:
        raise HeadSplitError("KV layouts differ beyond the head split (" + "; ".join(bad) + ")")


def copy_run_heads(
    src: Sequence[tuple[KvLayout, memoryview]], dst: Sequence[tuple[KvLayout, memoryview]],
    run: BlockRun,
) -> int:
    """Copy blocks `run` from every source shard's region into every destination shard's
    region, re-slicing heads; returns the bytes moved."""
    _check_alike(src[0][0], dst[0][0])
    src_arrays = [region_array(lay, reg) for lay, reg in src]
    dst_arrays = [region_array(lay, reg) for lay, reg in dst]
    moved = 0
    for p in head_pieces(split_of([s[0] for s in src]), split_of([d[0] for d in dst])):
        piece = src_arrays[p.src_shard][:, run.src : run.src + run.count, :,
                                        p.src_head : p.src_head + p.count]
        dst_arrays[p.dst_shard][:, run.dst : run.dst + run.count, :,
                                p.dst_head : p.dst_head + p.count] = piece
        moved += piece.nbytes
    return moved


def reslice_wire(layout: KvLayout, parts: Sequence[bytes | memoryview], count: int,
                 dst_shards: int) -> list[np.ndarray]:
    """A run of `count` blocks from every source shard (`parts`, rank order, each in wire
    order shaped by `layout`, e.g. the tcp chunks of one position) as the `dst_shards`
    destination shards' runs in wire order (flat uint8 arrays: `.data` is what
    `KvBlockIO.write_run` takes)."""
    src_split = HeadSplit(layout.num_kv_heads * len(parts), len(parts))
    dst_split = HeadSplit(src_split.total_heads, dst_shards)
    wires = [wire_array(layout, part, count) for part in parts]
    slab, blocks, tokens, _, width = wires[0].shape
    out = [np.empty((slab, blocks, tokens, dst_split.per_shard, width), dtype=np.uint8)
           for _ in range(dst_shards)]
    for p in head_pieces(src_split, dst_split):
        out[p.dst_shard][:, :, :, p.dst_head : p.dst_head + p.count] = \
            wires[p.src_shard][:, :, :, p.src_head : p.src_head + p.count]
    return [o.reshape(-1) for o in out]


def copy_run_heads_tensors(src: Sequence[Any], dst: Sequence[Any], run: BlockRun) -> int:
    """`copy_run_heads` for cache tensors `[layer, 2, slot, token, head, dim]` (torch, any
    device: GPU shards opened by CUDA IPC copy peer to peer); returns the bytes moved."""
    split_src = HeadSplit(src[0].shape[4] * len(src), len(src))
    split_dst = HeadSplit(dst[0].shape[4] * len(dst), len(dst))
    moved = 0
    for p in head_pieces(split_src, split_dst):
        piece = src[p.src_shard][:, :, run.src : run.src + run.count, :,
                                 p.src_head : p.src_head + p.count]
        dst[p.dst_shard][:, :, run.dst : run.dst + run.count, :,
                         p.dst_head : p.dst_head + p.count].copy_(piece, non_blocking=True)
        moved += piece.numel() * piece.element_size()
    return moved
