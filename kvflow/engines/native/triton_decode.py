"""Triton paged decode attention (GPU): one launch per layer for one new token per sequence.

The kernel applies RoPE to q and the new key, stores the new K/V in the paged cache, and
splits each context over several programs (flash-decoding) so a small batch still fills
the GPU; the last program of each KV head to finish merges the splits (an arrival counter
per sequence and KV head). Keys and values are read tile by tile through the block table.
The launch depends only on the batch size, so CUDA graphs capture it; it starts early on
Hopper and waits for the kernel ahead (triton_pdl.py). A decode step is latency-bound, so
every load is issued before the math that waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvflow.engines.native.attention import AttentionMetadata, Rope
from kvflow.engines.native.triton_pdl import PDL, gdc_launch_dependents, gdc_wait, launch_options

_MAX_SPLITS = 32


@dataclass(frozen=True)
class DecodeLaunch:
    """Tile width (cached tokens per loop turn) and warps of the decode kernel's programs."""

    block_n: int = 64
    num_warps: int = 4


DEFAULT_LAUNCH = DecodeLaunch()
# Large batches of 128-wide heads: 32 keys a turn on 2 warps. On the H200 (8B shape, batch
# 256, context 576, the engine's graphed decode, two repetitions; bench/decode_launch_gpu.py's
# probe): 20160 and 20098 tok/s against 17698 and 19497 with the default launch (19298 and
# 19244 with 32 keys on 4 warps).
# Narrow tiles made the 1.1B shape's (64-wide heads) batch-256 decode 12% slower, and smaller
# batches were not measured, so they keep the default.
LARGE_BATCH_LAUNCH = DecodeLaunch(32, 2)


def decode_launch(num_seqs: int, num_kv_heads: int, head_dim: int, num_sms: int) -> DecodeLaunch:
    """The launch a decode step of this shape takes (see LARGE_BATCH_LAUNCH)."""
    large = num_seqs * num_kv_heads >= 8 * num_sms
    return LARGE_BATCH_LAUNCH if large and head_dim == 128 else DEFAULT_LAUNCH


@triton.jit
def _rotate(x, partner, cos, sin, sign, HAS_ROPE: tl.constexpr):
    """Rotate-half RoPE of x given its other half (`partner`), in float32, rounded to x's dtype."""
    if not HAS_ROPE:
        return x
    return (x.to(tl.float32) * cos + sign * partner.to(tl.float32) * sin).to(x.dtype)


@triton.jit
def _kv_tile(k_cache_ptr, v_cache_ptr, bt_row, offs_n, valid, kv_col,
             stride_ks, BLOCK_SIZE: tl.constexpr):
    """Keys and values of cached positions `offs_n` (masked by `valid`), through the block table."""
    block = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=valid, other=0)
    slots = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
    kv_off = slots[:, None] * stride_ks + kv_col
    k = tl.load(k_cache_ptr + kv_off, mask=valid[:, None], other=0.0)
    v = tl.load(v_cache_ptr + kv_off, mask=valid[:, None], other=0.0)
    return k, v


@triton.jit
def _merge_splits(
    part_out_ptr, part_lse_ptr, out_ptr, first_row, first_head, num_used,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    """Combine the splits' partial outputs of GROUP heads by their LSE (one load of all)."""
    offs_g = tl.arange(0, GROUP_P2)
    offs_s = tl.arange(0, MAX_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_g[:, None] < GROUP) & (offs_s[None, :] < num_used)
    rows = (first_row + offs_g[:, None]) * MAX_SPLITS + offs_s[None, :]
    lse = tl.load(part_lse_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=".cg")
    parts = tl.load(part_out_ptr + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
    m = tl.max(lse, 1)
    w = tl.exp(lse - tl.where(m > float("-inf"), m, 0.0)[:, None])  # split 0 is never empty
    out = tl.sum(parts * w[:, :, None], 1) / tl.maximum(tl.sum(w, 1), 1e-30)[:, None]
    tl.store(out_ptr + (first_head + offs_g[:, None]) * HEAD_DIM + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=offs_g[:, None] < GROUP)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    bt_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr, count_ptr, out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_table,
    stride_ks, stride_kh_cache, stride_bt, stride_ot,
    scale, window, num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr, PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_ROPE: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (seq, kv_head, split): a slice of the cached context for the GROUP query heads
    of one KV head. Split 0 also takes the new token: rotates its key, stores K/V in the
    cache, and starts from its score. The program that finishes last merges the splits.
    Every load is issued before the math that waits for it (the step is latency-bound)."""
    if USE_PDL:  # triton_pdl.py: start early, wait for the kernel ahead
        gdc_launch_dependents()
        gdc_wait()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    slot = tl.load(slot_ptr + seq)
    pos = seq_len - 1  # the new token's position (read off seq_lens: one load less to wait for)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    partner = (offs_d + HEAD_DIM // 2) % HEAD_DIM  # rotate-half: d pairs with d + D/2
    heads = kv_head * GROUP + offs_g
    g_ok = offs_g < GROUP
    q_rows = q_ptr + seq * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    q_partner = tl.load(q_rows + partner[None, :], mask=g_ok[:, None], other=0.0)
    k_row = k_ptr + seq * stride_kt + kv_head * stride_kh
    k_new = tl.load(k_row + offs_d)
    k_partner = tl.load(k_row + partner)
    v_new = tl.load(v_ptr + seq * stride_vt + kv_head * stride_vh + offs_d)
    if HAS_ROPE:
        cos = tl.load(cos_ptr + pos * stride_table + offs_d % (HEAD_DIM // 2))
        sin = tl.load(sin_ptr + pos * stride_table + offs_d % (HEAD_DIM // 2))
    else:
        cos = tl.zeros([HEAD_DIM], tl.float32)
        sin = cos

    start = 0
    if HAS_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    end = seq_len - 1  # cached positions; the new token's K/V come from k_ptr, v_ptr
    per_split = tl.cdiv(tl.cdiv(end - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, end)
    bt_row = bt_ptr + seq * stride_bt
    kv_col = kv_head * stride_kh_cache + offs_d[None, :]
    offs_n = lo + tl.arange(0, BLOCK_N)
    k, v = _kv_tile(k_cache_ptr, v_cache_ptr, bt_row, offs_n, offs_n < hi, kv_col, stride_ks,
                    BLOCK_SIZE)

    sign = tl.where(offs_d < HEAD_DIM // 2, -1.0, 1.0)
    q = _rotate(q, q_partner, cos[None, :], sin[None, :], sign[None, :], HAS_ROPE)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if split == 0:
        k_new = _rotate(k_new, k_partner, cos, sin, sign, HAS_ROPE)
        dest = slot * stride_ks + kv_head * stride_kh_cache + offs_d
        tl.store(k_cache_ptr + dest, k_new)
        tl.store(v_cache_ptr + dest, v_new)
        m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        l_i = tl.full([GROUP_PAD], 1.0, tl.float32)
        acc = acc + v_new.to(tl.float32)[None, :]
    for n0 in range(lo, hi, BLOCK_N):  # k, v: this tile's, loaded a turn ahead
        valid = n0 + tl.arange(0, BLOCK_N) < hi
        offs_next = n0 + BLOCK_N + tl.arange(0, BLOCK_N)
        k_next, v_next = _kv_tile(k_cache_ptr, v_cache_ptr, bt_row, offs_next, offs_next < hi,
                                  kv_col, stride_ks, BLOCK_SIZE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        k, v = k_next, v_next

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if num_splits == 1:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * HEAD_DIM + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        row0 = (seq * tl.num_programs(1) + kv_head) * GROUP
        part = (row0 + offs_g) * MAX_SPLITS + split
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=g_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=g_ok)
        tl.debug_barrier()  # every thread's partials are written before the release below
        counter = count_ptr + seq * tl.num_programs(1) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:  # the last one here
            tl.store(counter, 0)  # zero again for the next launch
            used = tl.cdiv(end - start, tl.maximum(per_split, 1))  # splits that saw the cache
            _merge_splits(part_out_ptr, part_lse_ptr, out_ptr + seq * stride_ot, row0,
                          kv_head * GROUP, tl.maximum(used, 1), GROUP, GROUP_P2, HEAD_DIM,
                          MAX_SPLITS)


def precision(q: torch.Tensor) -> str:
    """Full float32 products for float32 models (tf32 would drift from the reference)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def decode_splits(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Enough splits that the launch covers the GPU about twice, but only for small batches."""
    want = (2 * num_sms + num_seqs * num_kv_heads - 1) // (num_seqs * num_kv_heads)
    return max(1, min(_MAX_SPLITS, want))


class SplitCounters:
    """Per (sequence, KV head) arrival counters of the decode kernel's splits, zero between launches.

    Each launch leaves them zero again, so one buffer serves every layer and every captured
    graph. A bigger batch gets a bigger buffer; the old ones are kept, since captured graphs
    still point at them.
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def get(self, n: int, device: torch.device) -> torch.Tensor:
        if not self.buffers or self.buffers[-1].numel() < n or self.buffers[-1].device != device:
            self.buffers.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
        return self.buffers[-1]


def paged_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, window: int | None, rope: Rope | None,
    num_splits: int, counters: torch.Tensor, launch: DecodeLaunch | None = None,
) -> torch.Tensor:
    """One query token per sequence (q: [B, H, D]): rope, K/V store and attention in one launch."""
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    scratch = num_seqs * num_heads * _MAX_SPLITS if num_splits > 1 else 1
    parts = torch.empty(scratch, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(scratch, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    cos, sin = (rope.cos, rope.sin) if rope is not None else (q, q)
    t = launch or DEFAULT_LAUNCH
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping, meta.block_tables,
        meta.seq_lens, parts, lse, counters, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        out.stride(0), scale, window or 0, num_splits,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        GROUP_P2=triton.next_power_of_2(group), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=t.block_n, MAX_SPLITS=_MAX_SPLITS,
        PRECISION=precision(q), HAS_WINDOW=window is not None, HAS_ROPE=rope is not None,
        num_warps=t.num_warps, num_stages=2, USE_PDL=PDL, **launch_options(),
    )
    return out
