"""BlockMover: batched copies between a KV cache and host slab rows, on CPU (the GPU
variant runs in tests/engines/native/test_gpu_tiers.py).

Every case checks bytes against `RegionBlockIO.read_run`, the per-block reference.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvflow.kv.blocks import RegionBlockIO  # noqa: E402
from kvflow.kv.layout import KvLayout  # noqa: E402
from kvflow.kv.tiers import mover as mover_mod  # noqa: E402
from kvflow.kv.tiers.mover import BlockMover, host_tensor, runs  # noqa: E402

LAYOUT = KvLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16",
                  device="cpu", num_slots=40)


def cache() -> tuple[RegionBlockIO, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (LAYOUT.region_bytes,), dtype=torch.uint8, generator=gen)
    return RegionBlockIO(LAYOUT, memoryview(data.numpy())), data


def test_runs_splits_sorted_rows_into_consecutive_pieces() -> None:
    assert runs(np.array([3, 4, 5, 9, 11, 12])) == [(3, 0, 3), (9, 3, 1), (11, 4, 2)]
    assert runs(np.array([], dtype=np.int64)) == []


@pytest.mark.parametrize("scattered", [False, True])
def test_to_host_then_to_device_moves_blocks_in_wire_order(monkeypatch, scattered: bool) -> None:
    if scattered:  # force the staging path (index_select / index_copy_ on the host)
        monkeypatch.setattr(mover_mod, "SCATTERED", 0)
    io, _ = cache()
    mover = BlockMover(io)
    assert not mover.pinned
    blocks = [7, 2, 30, 31, 5]
    slab = host_tensor(16, LAYOUT.block_bytes, pin=False)
    rows = [9, 3, 4, 5, 12] if scattered else [4, 5, 6, 7, 8]
    mover.to_host(blocks, slab, rows)
    for block, row in zip(blocks, rows, strict=True):
        assert slab[row].numpy().tobytes() == io.read_run(block, 1)
    mover.to_device([0, 1, 10, 11, 12], slab, rows)  # back into other device blocks
    for block, src in zip([0, 1, 10, 11, 12], blocks, strict=True):
        assert io.read_run(block, 1) == slab[rows[blocks.index(src)]].numpy().tobytes()


def test_long_runs_go_in_chunks(monkeypatch) -> None:
    monkeypatch.setattr(mover_mod, "CHUNK_BYTES", 3 * LAYOUT.block_bytes)
    io, _ = cache()
    mover = BlockMover(io)
    assert mover.chunk_blocks == 3
    want = [io.read_run(b, 1) for b in range(10)]
    slab = host_tensor(10, LAYOUT.block_bytes, pin=False)
    mover.to_host(range(10), slab, range(10))
    mover.to_device(range(20, 30), slab, range(10))
    assert [io.read_run(b, 1) for b in range(20, 30)] == want


def test_mismatched_rows_are_an_error() -> None:
    io, _ = cache()
    with pytest.raises(ValueError, match="2 blocks for 1 host rows"):
        BlockMover(io).to_host([1, 2], host_tensor(2, LAYOUT.block_bytes, pin=False), [0])
