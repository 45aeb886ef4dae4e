"""Moving KV blocks as bytes: the `KvBlockIO` each engine's cache implements, and block runs.

`KvBlockIO` reads and writes runs of consecutive blocks in the wire order of
`kvflow.kv.layout` (slab by slab). `RegionBlockIO` implements it over one flat memory
region (a bytearray, an mmap of /dev/shm, a CPU tensor's storage); a GPU cache implements
it with device copies (kvflow.engines.native.kv_io). `pair_runs` turns two block lists
into the fewest (src, dst, count) runs that are consecutive on both sides.

Ownership: a KvBlockIO never allocates or frees blocks. Reading a block is safe while
its owner holds a reference to it (the block pool never hands out a referenced block);
writing is safe only into blocks the writer's request owns and no step is computing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from kvflow.kv.layout import KvLayout


class BlockRun(NamedTuple):
    """`count` consecutive blocks from `src` on one side to `dst` on the other."""

    src: int
    dst: int
    count: int


def pair_runs(src: Sequence[int], dst: Sequence[int]) -> list[BlockRun]:
    """Merge a block-to-block mapping into runs consecutive on both sides."""
    assert len(src) == len(dst), f"{len(src)} source blocks for {len(dst)} destinations"
    runs: list[BlockRun] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            last = runs[-1]
            if s == last.src + last.count and d == last.dst + last.count:
                runs[-1] = BlockRun(last.src, last.dst, last.count + 1)
                continue
        runs.append(BlockRun(s, d, 1))
    return runs


class KvBlockIO(Protocol):
    """Block-level access to one worker's KV memory."""

    layout: KvLayout

    def read_run(self, start: int, count: int) -> bytes:
        """The KV of blocks `start..start+count-1`, slab by slab (layout wire order)."""
        ...

    def write_run(self, start: int, count: int, data: bytes | memoryview) -> None:
        """Overwrite blocks `start..start+count-1` with `data` as `read_run` returns it."""
        ...

    def region(self) -> memoryview | None:
        """The whole KV memory as host bytes, when it is host memory (else None)."""
        ...

    def device_tensor(self) -> Any | None:
        """The whole KV memory as one torch tensor on a GPU, when it is (else None)."""
        ...


class RegionBlockIO:
    """KvBlockIO over one flat host memory region laid out as `layout` says."""

    def __init__(self, layout: KvLayout, region: memoryview) -> None:
        assert region.nbytes >= layout.region_bytes, "the region is smaller than the layout"
        self.layout = layout
        self._region = region.cast("B") if region.format != "B" else region

    def region(self) -> memoryview:
        return self._region

    def device_tensor(self) -> None:
        return None

    def read_run(self, start: int, count: int) -> bytes:
        return read_run_from(self.layout, self._region, start, count)

    def write_run(self, start: int, count: int, data: bytes | memoryview) -> None:
        write_run_into(self.layout, self._region, start, count, data)


def read_run_from(layout: KvLayout, region: memoryview, start: int, count: int) -> bytes:
    """Gather a run's slab pieces out of `region` (someone else's, e.g. a shared segment)."""
    _check_run(layout, start, count)
    size = count * layout.slab_block_bytes
    out = bytearray(size * layout.num_slabs)
    for slab in range(layout.num_slabs):
        at = layout.slab_offset(slab, start)
        out[slab * size : (slab + 1) * size] = region[at : at + size]
    return bytes(out)


def write_run_into(
    layout: KvLayout, region: memoryview, start: int, count: int, data: bytes | memoryview
) -> None:
    _check_run(layout, start, count)
    size = count * layout.slab_block_bytes
    if len(data) != size * layout.num_slabs:
        raise ValueError(f"a run of {count} blocks is {size * layout.num_slabs} bytes, got {len(data)}")
    view = memoryview(data).cast("B")
    for slab in range(layout.num_slabs):
        at = layout.slab_offset(slab, start)
        region[at : at + size] = view[slab * size : (slab + 1) * size]


def copy_run(
    src_layout: KvLayout, src: memoryview, dst_layout: KvLayout, dst: memoryview, run: BlockRun
) -> None:
    """Copy one run between two regions of compatible layouts, slab by slab (no staging)."""
    _check_run(src_layout, run.src, run.count)
    _check_run(dst_layout, run.dst, run.count)
    size = run.count * src_layout.slab_block_bytes
    for slab in range(src_layout.num_slabs):
        s, d = src_layout.slab_offset(slab, run.src), dst_layout.slab_offset(slab, run.dst)
        dst[d : d + size] = src[s : s + size]


def _check_run(layout: KvLayout, start: int, count: int) -> None:
    if start < 0 or count < 1 or start + count > layout.num_slots:
        raise ValueError(f"blocks {start}..{start + count - 1} are outside 0..{layout.num_slots - 1}")
