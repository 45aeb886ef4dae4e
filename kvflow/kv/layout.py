"""KV layout descriptors: how a worker's KV memory is shaped, and whether two workers agree.

A `KvLayout` travels in discovery (msgpack), so a peer checks it before any byte moves.
Memory order is fixed by `axes`: one slab per (layer, k|v), each slab `num_slots` blocks
of `block_size * num_kv_heads * head_dim` elements. A run of consecutive blocks is then
`2 * num_layers` contiguous pieces, one per slab; the bytes of a run on the wire are
those pieces in slab order (exactly `cache[:, :, start:start+n]` of the native engine's
`[layer, 2, slot, token, head, dim]` tensor).
"""

from __future__ import annotations

import msgspec

AXES = ("layer", "kv", "block", "token", "head", "dim")

_ELEMENT_SIZE = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1,
}

# Fields two transfer peers must agree on, in the order a mismatch is reported.
_MUST_MATCH = ("block_size", "num_layers", "num_kv_heads", "head_dim", "dtype", "axes")


class KvLayoutMismatch(ValueError):
    """Two workers' KV layouts differ; the message names every differing value on both sides."""


class KvLayout(msgspec.Struct, frozen=True, omit_defaults=True):
    """A worker's KV memory: per-layer shape, block size, axis order, dtype and device."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # a torch dtype name without "torch." ("bfloat16")
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "sim" (the mocker: sized bytes)
    num_slots: int = 0  # blocks in memory (the pool's, plus any padding block)
    axes: tuple[str, ...] = AXES

    def __post_init__(self) -> None:
        if self.dtype not in _ELEMENT_SIZE:
            raise ValueError(f"unknown KV dtype {self.dtype!r}; known: {', '.join(_ELEMENT_SIZE)}")
        if min(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError(f"a KV layout needs positive sizes, got {self}")

    @property
    def element_size(self) -> int:
        return _ELEMENT_SIZE[self.dtype]

    @property
    def slab_block_bytes(self) -> int:
        """Bytes of one block within one (layer, k|v) slab."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def num_slabs(self) -> int:
        return 2 * self.num_layers

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over every layer, keys and values."""
        return self.num_slabs * self.slab_block_bytes

    @property
    def region_bytes(self) -> int:
        """Bytes of the whole KV memory (every slot of every slab)."""
        return self.num_slabs * self.num_slots * self.slab_block_bytes

    def slab_offset(self, slab: int, block: int) -> int:
        """Byte offset of `block` within slab `slab` (layer * 2 + k|v) of the whole memory."""
        return (slab * self.num_slots + block) * self.slab_block_bytes


def layout_mismatches(local: KvLayout, remote: KvLayout) -> list[str]:
    """One `field: local X vs remote Y` line per differing field (empty when they agree)."""
    return [
        f"{name}: this worker {getattr(local, name)!r} vs peer {getattr(remote, name)!r}"
        for name in _MUST_MATCH
        if getattr(local, name) != getattr(remote, name)
    ]


def check_compatible(local: KvLayout, remote: KvLayout, peer: str = "peer") -> None:
    """Raise KvLayoutMismatch naming both values of every field the two layouts disagree on."""
    problems = layout_mismatches(local, remote)
    if problems:
        raise KvLayoutMismatch(
            f"KV layout of {peer} does not match this worker's ({'; '.join(problems)}); "
            "prefill and decode workers must serve the same model with the same "
            "--block-size and KV dtype"
        )
