"""The Triton attention backend (GPU): varlen causal prefill over paged blocks; decode: triton_decode.py.

Keys and values are gathered tile by tile through the block table straight from the paged
cache; nothing is copied into a contiguous buffer. Prefill steps rotate q and k, store the
new K/V (`store_kv`), then attend; a decode step is one fused launch (triton_decode.py).
One long fresh prompt alone in a step (no cached prefix) is attended by cuDNN's fused
attention instead (`DensePrefill`), over the step's own q, k and v, which one launch
(`pack_dense`) rotates, stores in the cache and writes to padded contiguous buffers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvflow.engines.native.attention import AttentionMetadata, Rope, prefill_tiles, register_backend
from kvflow.engines.native.triton_decode import (
    SplitCounters,
    decode_launch,
    decode_splits,
    paged_decode,
    precision,
)
from kvflow.engines.native.triton_pdl import PDL, gdc_launch_dependents, gdc_wait, launch_options

log = logging.getLogger(__name__)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, tile_seq_ptr, tile_start_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
    scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr, MASK_ALL: tl.constexpr, PACK: tl.constexpr,
):
    # axis 0 (fastest: a tile's heads start together, the longest tiles first): the query head,
    # or with PACK the KV head, whose GROUP query heads share the tile's rows (query-major)
    tile = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    if PACK:
        kv_head = tl.program_id(0)
        heads = (kv_head * GROUP + rows % GROUP)[:, None]  # each row's query head
        offs_q = rows // GROUP
        queries = BLOCK_M // GROUP
    else:
        kv_head = tl.program_id(0) // GROUP
        heads = tl.program_id(0)  # one query head for the whole tile
        offs_q = rows
        queries = BLOCK_M
    seq = tl.load(tile_seq_ptr + tile)
    q_start = tl.load(tile_start_ptr + tile)
    row0 = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - row0
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len

    offs_m = q_start + offs_q
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q_pos = ctx + offs_m
    q = tl.load(q_ptr + (row0 + offs_m)[:, None] * stride_qt + heads * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    first_q = ctx + q_start
    last_q = tl.minimum(ctx + q_start + queries, seq_len)  # exclusive
    lo = 0
    full_hi = first_q // BLOCK_N * BLOCK_N  # tiles below it need no mask
    if HAS_WINDOW:
        lo = tl.maximum(first_q - window + 1, 0) // BLOCK_N * BLOCK_N
        full_hi = lo
    if MASK_ALL:  # every key tile through the masked loop: a row rounds alike in any tile
        full_hi = lo
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    qk_scale = scale * 1.4426950408889634  # exp2 domain
    for n0 in range(lo, full_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        block = tl.load(bt_row + offs_n // BLOCK_SIZE)
        slots = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_off = slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :]
        k = tl.load(k_ptr + kv_off)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        v = tl.load(v_ptr + kv_off)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    for n0 in range(full_hi, last_q, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < last_q
        block = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=valid, other=0)
        slots = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_off = slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        seen = (offs_n[None, :] <= q_pos[:, None]) & valid[None, :]
        if HAS_WINDOW:
            seen = seen & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + (row0 + offs_m)[:, None] * stride_ot + heads * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch, num_kv_heads,
    HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # triton_pdl.py: start early, wait for the kernel ahead
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    offs_d = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < num_kv_heads
    dest = slot * stride_cs + heads * stride_ch + offs_d
    k = tl.load(k_ptr + t * stride_kt + heads * stride_kh + offs_d, mask=mask)
    tl.store(kc_ptr + dest, k, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + offs_d, mask=mask)
    tl.store(vc_ptr + dest, v, mask=mask)


def store_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """write_kv in one launch; k and v may be strided views of the fused qkv output."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        k.shape[1], HEAD_DIM=k.shape[2], HEADS_PAD=triton.next_power_of_2(k.shape[1]),
        num_warps=1, USE_PDL=PDL, **launch_options(),
    )


@dataclass(frozen=True)
class PrefillTiling:
    """Tile shape and launch parameters of the prefill kernel."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2


LONG_TILING = PrefillTiling()
SHORT_TILING = PrefillTiling(block_m=16, block_n=64, num_warps=4, num_stages=2)
# 128-wide heads, chunks of WIDE_FROM rows or more: 256 query rows on 16 warps. On the H200
# (`bench/prefill_attention_gpu.py --shape 8b 1b --lengths 2048 4096 8192 --context 0 4096`,
# TFLOP/s against the long tiling) 378 vs 301 at 8192 rows, 406 vs 304 for 8192 after 4096
# cached, 366 vs 289 for 4096 after 4096, 195 vs 185 at 2048 (where 128 x 128 on 8 warps, 3
# stages, read 225 in that run); 64-wide heads lose with it (282 vs 332 at 8192).
WIDE_TILING = PrefillTiling(block_m=256, block_n=64, num_warps=16, num_stages=2)
WIDE_FROM = 1024


def prefill_tiling(head_dim: int, max_query_len: int) -> PrefillTiling:
    """The short tiling for steps of short chunks (64 rows or fewer), the wide one for long
    chunks of 128-wide heads, else the long one; above a 128-wide head the tiles shrink in
    proportion so a tile's Q, K and V stay within shared memory (a 512-wide head with the
    128 x 64 tile needs ~545 KiB; an H200 SM has 227)."""
    if max_query_len <= 64:
        t = SHORT_TILING
    elif head_dim == 128 and max_query_len >= WIDE_FROM:
        t = WIDE_TILING
    else:
        t = LONG_TILING
    shrink = max(head_dim // 128, 1)
    if shrink == 1:
        return t
    return replace(t, block_m=max(16, t.block_m // shrink),
                               block_n=max(16, t.block_n // shrink))


def paged_prefill(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    window: int | None, tiling: PrefillTiling | None = None, mask_all: bool = False,
    pack: bool = False,
) -> torch.Tensor:
    """Any number of query tokens per sequence, causal over cached + new tokens. `mask_all`:
    no unmasked fast loop, so a row's rounding does not depend on where its tile starts.
    `pack`: a program per KV head, its query heads' rows in one tile (each K/V tile is read
    once per KV head, not once per query head); needs the group to divide the tile's rows.
    A row computes the same either way."""
    _, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    t = tiling or prefill_tiling(head_dim, meta.max_query_len)
    group = num_heads // num_kv_heads
    assert not pack or t.block_m % group == 0, "pack: the group must divide the tile's rows"
    block_m, block_n = (t.block_m // group if pack else t.block_m), t.block_n  # queries per tile
    key = ("prefill_tiles", block_m, window)
    tiles = meta.per_step.get(key)
    if tiles is None and meta.is_decode:  # one tile per sequence, built on the device: a
        n = meta.seq_lens.shape[0]        # captured decode graph reads no host lists
        tiles = torch.zeros(2, n, dtype=torch.int32, device=q.device)
        torch.arange(n, dtype=torch.int32, device=q.device, out=tiles[0])
        meta.per_step[key] = tiles
    if tiles is None:  # once per step, not per layer
        seqs, starts = prefill_tiles(meta, block_m, window)
        assert len(seqs) <= 65535, "a step of more query tiles than a CUDA grid's second axis holds"
        tiles = torch.tensor([seqs, starts], dtype=torch.int32).to(q.device, non_blocking=True)
        meta.per_step[key] = tiles
    out = torch.empty_like(q)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _prefill_kernel[(num_kv_heads if pack else num_heads, tiles.shape[1])](
        q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        tiles[0], tiles[1],
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        out.stride(0), out.stride(1),
        scale, window or 0,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=t.block_m, BLOCK_N=block_n, PRECISION=precision(q), HAS_WINDOW=window is not None,
        MASK_ALL=mask_all, PACK=pack, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out


@triton.jit(do_not_specialize=["rows"])  # one compile for every prompt length (warm-up's)
def _pack_dense_kernel(
    q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, vo_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, cos_ptr,
    sin_ptr, rows, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_table, stride_cs, stride_ch, num_heads, num_kv_heads,
    HALF: tl.constexpr, HEADS_PAD: tl.constexpr, KV_PAD: tl.constexpr, ROPE: tl.constexpr,
):
    """One row: q and k rotated (as `_rope_kernel` does), then q, k and v written to the padded
    contiguous buffers and k and v to their cache slots; a padding row writes zeros."""
    t = tl.program_id(0)
    offs = tl.arange(0, HALF)[None, :]
    heads = tl.arange(0, HEADS_PAD)[:, None]
    kv_heads = tl.arange(0, KV_PAD)[:, None]
    q_mask = heads < num_heads
    kv_mask = kv_heads < num_kv_heads
    q_live = q_mask & (heads * 0 + t < rows)  # a padding row reads nothing and writes zeros
    kv_live = kv_mask & (kv_heads * 0 + t < rows)
    src_q = q_ptr + t * stride_qt + heads * stride_qh + offs
    src_k = k_ptr + t * stride_kt + kv_heads * stride_kh + offs
    src_v = v_ptr + t * stride_vt + kv_heads * stride_vh + offs
    q1 = tl.load(src_q, mask=q_live, other=0.0)
    q2 = tl.load(src_q + HALF, mask=q_live, other=0.0)
    k1 = tl.load(src_k, mask=kv_live, other=0.0)
    k2 = tl.load(src_k + HALF, mask=kv_live, other=0.0)
    v1 = tl.load(src_v, mask=kv_live, other=0.0)
    v2 = tl.load(src_v + HALF, mask=kv_live, other=0.0)
    dtype = q1.dtype
    if ROPE:
        pos = tl.load(pos_ptr + tl.minimum(t, rows - 1))
        cos = tl.load(cos_ptr + pos * stride_table + offs)
        sin = tl.load(sin_ptr + pos * stride_table + offs)
        a, b = q1.to(tl.float32), q2.to(tl.float32)
        q1, q2 = (a * cos - b * sin).to(dtype), (b * cos + a * sin).to(dtype)
        a, b = k1.to(tl.float32), k2.to(tl.float32)
        k1, k2 = (a * cos - b * sin).to(dtype), (b * cos + a * sin).to(dtype)
    dst_q = qo_ptr + (t * num_heads + heads) * 2 * HALF + offs
    dst_kv = (t * num_kv_heads + kv_heads) * 2 * HALF + offs
    tl.store(dst_q, q1, mask=q_mask)
    tl.store(dst_q + HALF, q2, mask=q_mask)
    tl.store(ko_ptr + dst_kv, k1, mask=kv_mask)
    tl.store(ko_ptr + dst_kv + HALF, k2, mask=kv_mask)
    tl.store(vo_ptr + dst_kv, v1, mask=kv_mask)
    tl.store(vo_ptr + dst_kv + HALF, v2, mask=kv_mask)
    slot = tl.load(slot_ptr + tl.minimum(t, rows - 1))
    cache = slot * stride_cs + kv_heads * stride_ch + offs
    tl.store(kc_ptr + cache, k1, mask=kv_live)
    tl.store(kc_ptr + cache + HALF, k2, mask=kv_live)
    tl.store(vc_ptr + cache, v1, mask=kv_live)
    tl.store(vc_ptr + cache + HALF, v2, mask=kv_live)


def pack_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               slots: torch.Tensor, rope: Rope | None, length: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch for a DensePrefill step: RoPE on q and k, their K/V stored in the cache, and
    q, k and v [T, heads, D] (strided views of the fused qkv output) written to contiguous
    [length, heads, D] buffers with zero rows after T, as cuDNN's plans are built for. This
    replaces the RoPE, K/V store and three strided copies the step took before."""
    rows, heads, dim = q.shape
    kv_heads = k.shape[1]
    qp = q.new_empty(length, heads, dim)
    kp, vp = k.new_empty(length, kv_heads, dim), v.new_empty(length, kv_heads, dim)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    positions, cos, sin = (rope.positions, rope.cos, rope.sin) if rope is not None else (slots, slots, slots)
    _pack_dense_kernel[(length,)](
        q, k, v, qp, kp, vp, k_cache, v_cache, slots, positions, cos, sin, rows,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), k_cache.stride(1), k_cache.stride(2), heads, kv_heads,
        HALF=dim // 2, HEADS_PAD=triton.next_power_of_2(heads),
        KV_PAD=triton.next_power_of_2(kv_heads), ROPE=rope is not None, num_warps=4,
    )
    return qp, kp, vp


# Query rows from which one fresh prompt goes to cuDNN: in the bench run above, 8B shape,
# cuDNN against the best Triton tiling, 346 vs 298 TFLOP/s at 4096 rows, 511 vs 378 at 8192;
# at 2048 a tie (227 vs 225; an earlier probe had cuDNN losing there, 179 vs 202).
DENSE_FROM = 4096
DENSE_BUCKET = 512  # cuDNN builds a plan per shape (~75 ms): lengths round up to a multiple


def dense_length(q_len: int) -> int:
    """The padded length a prompt of `q_len` rows is attended at by DensePrefill."""
    return -(-q_len // DENSE_BUCKET) * DENSE_BUCKET


class DensePrefill:
    """cuDNN's fused causal attention (torch SDPA) for a step that is one fresh prompt of
    DENSE_FROM rows or more: no cached prefix, so its keys are exactly the step's own k and v,
    and the paged gather can be skipped. It takes q, k and v as contiguous tensors padded to a
    multiple of DENSE_BUCKET rows (`pack_dense`): cuDNN keys its plans on shape and strides,
    so the plans warm-up builds serve every length (cuDNN read strided views of the fused qkv
    output more slowly than contiguous copies, in a probe on the H200 at 8192 rows); padding
    sits after the prompt, where causal masking keeps it from every real row. Enabled on
    sm_90 (Hopper) only, where it was measured.
    Where cuDNN attention is not available it says so once and the paged kernel serves;
    an error on a later call is logged and that step served by the paged kernel too."""

    def __init__(self, enabled: bool) -> None:
        self.available: bool | None = None if enabled else False  # None: not tried yet

    def fits(self, dtype: torch.dtype, head_dim: int) -> bool:
        return self.available is not False and dtype in (torch.bfloat16, torch.float16) and head_dim <= 128

    def applies(self, q: torch.Tensor, meta: AttentionMetadata, window: int | None) -> bool:
        return (self.fits(q.dtype, q.shape[-1]) and window is None and meta.num_seqs == 1
                and meta.max_query_len >= DENSE_FROM
                and meta.seq_lens_host[0] == meta.max_query_len)  # nothing cached before it

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int,
                 scale: float) -> torch.Tensor | None:
        """Attention of the first `rows` of padded contiguous q [L, H, D], k and v [L, KVH, D]:
        [rows, H, D], or None where cuDNN cannot run it."""

        def heads_first(x: torch.Tensor) -> torch.Tensor:  # [L, H, D] -> [1, H, L, D]
            return x.transpose(0, 1)[None]

        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(
                    heads_first(q), heads_first(k), heads_first(v), is_causal=True, scale=scale,
                    enable_gqa=q.shape[1] != k.shape[1])
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # first call: "No available kernel" (this GPU or build has none)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if self.available is None:
                log.warning("cuDNN attention unavailable (%s); long prompts use the Triton "
                            "prefill kernel", reason)
                self.available = False
            else:
                log.warning("cuDNN attention failed for a %d-token prompt (%s); the Triton "
                            "prefill kernel serves it", rows, reason)
            return None
        self.available = True
        return out[0, :, :rows].transpose(0, 1)


@register_backend("triton")
class TritonPagedBackend:
    """GPU: decode batches through the fused split-KV kernel, one long fresh prompt through
    cuDNN (DensePrefill), anything else through the paged prefill kernel."""

    def __init__(self) -> None:
        self.num_sms = (
            torch.cuda.get_device_properties(0).multi_processor_count
            if torch.cuda.is_available() else 8
        )
        self.counters = SplitCounters()
        self.dense = DensePrefill(torch.cuda.is_available()
                                  and torch.cuda.get_device_capability() == (9, 0))

    def warm_up(self, max_tokens: int, heads: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device) -> tuple[int, ...]:
        """Build cuDNN's plan for every DensePrefill bucket a step of up to `max_tokens` rows
        can fall in; returns the padded lengths warmed (none without cuDNN). PyTorch keeps
        cuDNN's plans per thread: call it on the thread that runs the steps (warmup.py)."""
        warmed: list[int] = []
        if not self.dense.fits(dtype, head_dim):
            return ()
        for rows in range(DENSE_FROM, dense_length(max_tokens) + 1, DENSE_BUCKET):
            q = torch.zeros(rows, heads, head_dim, dtype=dtype, device=device)
            k = torch.zeros(rows, kv_heads, head_dim, dtype=dtype, device=device)
            if self.dense(q, k, k, rows, head_dim ** -0.5) is None:
                break
            warmed.append(rows)
        return tuple(warmed)

    def graphable(self, head_dim: int) -> bool:
        return not head_dim & (head_dim - 1)  # (other widths are refused at the first step)

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
        head_dim = q.shape[-1]
        if head_dim & (head_dim - 1):
            raise ValueError(
                f"the Triton attention kernels need a power-of-two head_dim, got {head_dim}; "
                "run with the 'torch' attention backend"
            )
        if meta.is_decode:
            num_kv_heads = kv_cache.shape[3]
            splits = decode_splits(meta.num_seqs, num_kv_heads, self.num_sms)
            counters = self.counters.get(meta.num_seqs * num_kv_heads, q.device)
            launch = decode_launch(meta.num_seqs, num_kv_heads, head_dim, self.num_sms)
            return paged_decode(q, k, v, kv_cache, meta, scale, window, rope, splits, counters,
                                launch)
        if self.dense.applies(q, meta, window):
            rows = q.shape[0]
            q, k, v = pack_dense(q, k, v, kv_cache, meta.slot_mapping, rope, dense_length(rows))
            out = self.dense(q, k, v, rows, scale)
            return out if out is not None else paged_prefill(q[:rows], kv_cache, meta, scale, window)
        if rope is not None:
            q, k = rope(q, k)
        store_kv(kv_cache, k, v, meta.slot_mapping)
        return paged_prefill(q, kv_cache, meta, scale, window)
