"""Paged attention: the per-step batch layout, the backend registry, and the gather-based backend.

A step's tokens are flattened into one row per token (`T` rows). Sequence `i` owns rows
`query_start_loc[i]:query_start_loc[i+1]`; its whole context (cached + new) is `seq_lens[i]`
tokens, stored in the blocks `block_tables[i]`. The new tokens are the last ones of that
context. Each layer's cache is one tensor `[2, num_blocks, block_size, kv_heads, head_dim]`
(K then V); token `t` of a sequence lives in slot `block_tables[i][t // bs] * bs + t % bs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each token of a step reads and writes its keys and values."""

    slot_mapping: torch.Tensor  # int64 [T]: cache slot each new token's K/V goes to
    query_start_loc: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B]: context length after this step
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that loop per sequence.
    query_start_host: list[int]
    seq_lens_host: list[int]
    # What a backend derives once per step and every layer reuses (e.g. the prefill tiles).
    per_step: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


def prefill_tiles(meta: AttentionMetadata, block_m: int,
                  window: int | None = None) -> tuple[list[int], list[int]]:
    """(sequence, first query row) of every `block_m` tile of queries, in launch order: the
    tiles that see the most keys first (a cached prefix counts; a sliding window caps them).
    A causal tile's work grows with its position, so in prompt order a long prompt's last
    (and longest) tiles would start last and run on while the rest of the GPU idles; longest
    first, the short ones fill in behind them."""
    tiles: list[tuple[int, int, int]] = []
    qs = meta.query_start_host
    for i, seq_len in enumerate(meta.seq_lens_host):
        q_len = qs[i + 1] - qs[i]
        ctx = seq_len - q_len
        for start in range(0, q_len, block_m):
            keys = ctx + min(start + block_m, q_len)
            if window is not None:
                keys = min(keys, window + block_m)
            tiles.append((-keys, i, start))
    tiles.sort()
    return [i for _, i, _ in tiles], [start for _, _, start in tiles]


def single_prefill_meta(tokens: int, block_size: int, device: torch.device | str,
                        cached: int = 0) -> AttentionMetadata:
    """One sequence prefilling `tokens` tokens after `cached` ones already in the cache, in
    blocks 0, 1, ... (warm-up, the prefill fast path, benches)."""
    total = cached + tokens
    return AttentionMetadata(
        slot_mapping=torch.arange(cached, total, device=device),
        query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([total], dtype=torch.int32, device=device),
        block_tables=torch.arange(-(-total // block_size), dtype=torch.int32, device=device)[None, :],
        max_query_len=tokens, max_seq_len=total,
        query_start_host=[0, tokens], seq_lens_host=[total],
    )


def uniform_decode_meta(batch: int, context: int, block_size: int,
                        device: torch.device | str) -> AttentionMetadata:
    """`batch` sequences of `context` cached tokens, each decoding its next one, in
    disjoint runs of blocks (warm-up, benches)."""
    blocks = -(-(context + 1) // block_size)
    table = torch.arange(batch * blocks, dtype=torch.int32, device=device).view(batch, blocks)
    return AttentionMetadata(
        slot_mapping=table[:, -1].long() * block_size + context % block_size,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), context + 1, dtype=torch.int32, device=device),
        block_tables=table, max_query_len=1, max_seq_len=context + 1,
        query_start_host=list(range(batch + 1)), seq_lens_host=[context + 1] * batch,
    )


RopeFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, torch.Tensor],
]


@dataclass(frozen=True)
class Rope:
    """Rotary embedding still to apply to q and k: positions [T], the float32 cos/sin tables
    [positions, D/2], and the op that applies it (`Ops.rope`) for backends that do not fuse it."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    apply: RopeFn

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(self.positions, q, k, self.cos, self.sin)


class AttentionBackend(Protocol):
    """Computes attention for one layer, after storing the step's new K/V in the cache."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; returns [T, H, D]. With `rope`, q and k are
        rotated first (a backend may fuse that into its kernels)."""
        ...

    def warm_up(self, max_tokens: int, heads: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device) -> tuple[int, ...]:
        """Prepare what the backend builds per shape (plans, not compiles: those warm by
        running steps) for steps of up to `max_tokens` rows, on the calling thread; returns
        the prompt lengths it prepared (none for most backends)."""
        ...

    def graphable(self, head_dim: int) -> bool:
        """Whether a decode step can be captured in a CUDA graph: its kernels read the
        lengths and block tables on the device, never the metadata's host lists."""
        ...


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[Callable[[], AttentionBackend]], Callable]:
    def wrap(factory: Callable[[], AttentionBackend]) -> Callable[[], AttentionBackend]:
        assert name not in _BACKENDS, f"attention backend {name!r} registered twice"
        _BACKENDS[name] = factory
        return factory

    return wrap


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto` picks Triton on CUDA and the gather backend elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        from kvflow.engines.native import triton_attention  # noqa: F401  (registers itself)
    if name == "invariant":
        from kvflow.engines.native import invariant  # noqa: F401  (registers itself)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: auto, {', '.join(_BACKENDS)}")
    return _BACKENDS[name]()


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the step's keys and values in their cache slots (in place, graph-capturable)."""
    _, _, _, kv_heads, head_dim = kv_cache.shape
    kv_cache[0].view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    kv_cache[1].view(-1, kv_heads, head_dim).index_copy_(0, slots, v)


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values, [seq_len, KVH, D] each, copied out of the cache."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    blocks = block_table[: (seq_len + block_size - 1) // block_size].long()
    keys = kv_cache[0, blocks].reshape(-1, kv_heads, head_dim)[:seq_len]
    values = kv_cache[1, blocks].reshape(-1, kv_heads, head_dim)[:seq_len]
    return keys, values


def context_mask(q_len: int, seq_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, seq_len]: query j (position seq_len - q_len + j) may see key t."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


@register_backend("torch")
class TorchGatherBackend:
    """Any device: per sequence, gather its context out of the blocks and run SDPA."""

    def warm_up(self, max_tokens: int, heads: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device) -> tuple[int, ...]:
        return ()  # nothing shape-keyed to prepare

    def graphable(self, head_dim: int) -> bool:
        return False  # loops over the sequences' host lengths

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        if rope is not None:
            q, k = rope(q, k)
        return attend_per_sequence(q, k, v, kv_cache, meta, scale, window, _sdpa)


SequenceAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, "int | None"],
                             torch.Tensor]


def attend_per_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, window: int | None, attend: SequenceAttention,
) -> torch.Tensor:
    """Store the step's K/V, then per sequence gather its context and `attend` over it."""
    write_kv(kv_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    starts = meta.query_start_host
    for i, seq_len in enumerate(meta.seq_lens_host):
        lo, hi = starts[i], starts[i + 1]
        keys, values = gather_context(kv_cache, meta.block_tables[i], seq_len)
        out[lo:hi] = attend(q[lo:hi], keys, values, scale, window)
    return out


def _sdpa(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    q_len, seq_len = q.shape[0], keys.shape[0]
    mask = context_mask(q_len, seq_len, window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        keys.transpose(0, 1),
        values.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)
