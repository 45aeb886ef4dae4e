"""Head re-slicing between KV memories split over different TP sizes (shm regions, wire bytes, tensors)."""

from __future__ import annotations

import numpy as np
import pytest

from kvflow.kv.blocks import BlockRun, read_run_from, write_run_into
from kvflow.kv.heads import (
    HeadPiece,
    HeadSplit,
    HeadSplitError,
    copy_run_heads,
    copy_run_heads_tensors,
    head_pieces,
    reslice_wire,
)
from kvflow.kv.layout import KvLayout
from kvflow.kv.shm import SharedRegion
from kvflow.testing.kv_shards import head_shards

LAYERS, SLOTS, BS, HEADS, DIM = 2, 6, 4, 4, 8


def _layout(heads: int) -> KvLayout:
    return KvLayout(num_layers=LAYERS, block_size=BS, num_kv_heads=heads, head_dim=DIM,
                    dtype="float32", num_slots=SLOTS)


def _full(seed: int) -> np.ndarray:
    """A whole (TP=1) KV memory: [slab, slot, token, head, dim] float32."""
    return np.random.default_rng(seed).standard_normal((2 * LAYERS, SLOTS, BS, HEADS, DIM),
                                                       dtype=np.float32)


def _gather(regions: list[SharedRegion]) -> np.ndarray:
    n = len(regions)
    parts = [np.frombuffer(r.view, dtype=np.float32).reshape(2 * LAYERS, SLOTS, BS, HEADS // n, DIM)
             for r in regions]
    return np.concatenate(parts, axis=3)


def test_head_pieces_cover_every_head_once() -> None:
    assert head_pieces(HeadSplit(4, 2), HeadSplit(4, 1)) == [HeadPiece(0, 0, 0, 0, 2),
                                                            HeadPiece(1, 0, 0, 2, 2)]
    assert head_pieces(HeadSplit(8, 4), HeadSplit(8, 2)) == [
        HeadPiece(0, 0, 0, 0, 2), HeadPiece(1, 0, 0, 2, 2),
        HeadPiece(2, 0, 1, 0, 2), HeadPiece(3, 0, 1, 2, 2)]
    assert sum(p.count for p in head_pieces(HeadSplit(12, 3), HeadSplit(12, 4))) == 12
    with pytest.raises(HeadSplitError, match="same model"):
        head_pieces(HeadSplit(4, 2), HeadSplit(8, 1))
    with pytest.raises(HeadSplitError, match="do not split"):
        head_pieces(HeadSplit(4, 3), HeadSplit(4, 1))


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 2), (2, 4), (4, 2), (2, 2)])
def test_copy_run_heads_between_shm_regions(src_tp: int, dst_tp: int) -> None:
    full = _full(seed=src_tp * 10 + dst_tp)
    src = head_shards(full, src_tp)
    dst = head_shards(np.zeros_like(full), dst_tp)
    attached = [SharedRegion.attach(r.name) for r in src]  # the puller maps the holder's shards
    try:
        run = BlockRun(src=1, dst=3, count=2)
        moved = copy_run_heads([(_layout(HEADS // src_tp), a.view) for a in attached],
                               [(_layout(HEADS // dst_tp), d.view) for d in dst], run)
        got = _gather(dst)
        want = np.zeros_like(full)
        want[:, 3:5] = full[:, 1:3]
        np.testing.assert_array_equal(got, want)
        assert moved == full[:, 1:3].nbytes
    finally:
        for region in [*attached, *src, *dst]:
            region.close()


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 2), (2, 4), (4, 2), (2, 2)])
def test_reslice_wire_runs_of_every_source_shard(src_tp: int, dst_tp: int) -> None:
    """What a tcp puller does with one position's chunks (one per holder rank)."""
    full = _full(seed=src_tp + 7 * dst_tp)
    src = head_shards(full, src_tp)
    dst = head_shards(np.zeros_like(full), dst_tp)
    try:
        layout = _layout(HEADS // src_tp)
        wires = [read_run_from(layout, region.view, 1, 2) for region in src]
        out = reslice_wire(layout, wires, 2, dst_tp)
        assert len(out) == dst_tp
        for region, wire in zip(dst, out, strict=True):  # each rank's run, as write_run takes it
            write_run_into(_layout(HEADS // dst_tp), region.view, 3, 2, wire.data)
        got = _gather(dst)
        np.testing.assert_array_equal(got[:, 3:5], full[:, 1:3])
        assert not got[:, :3].any() and not got[:, 5:].any()
    finally:
        for region in [*src, *dst]:
            region.close()


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 2), (4, 2)])
def test_copy_run_heads_between_cache_tensors(src_tp: int, dst_tp: int) -> None:
    torch = pytest.importorskip("torch")
    full = torch.randn(LAYERS, 2, SLOTS, BS, HEADS, DIM)  # the engine's cache axes
    src = [t.contiguous() for t in full.chunk(src_tp, dim=4)]
    dst = [torch.zeros_like(t) for t in full.chunk(dst_tp, dim=4)]
    moved = copy_run_heads_tensors(src, dst, BlockRun(src=0, dst=2, count=3))
    want = torch.zeros_like(full)
    want[:, :, 2:5] = full[:, :, 0:3]
    assert torch.equal(torch.cat(dst, dim=4), want)
    assert moved == full[:, :, 0:3].numel() * 4
