"""Triton matrix-vector products for decode steps of a few rows, with the layer's input op fused in.

One decode token per sequence makes every projection a GEMV: it reads the whole weight
once and does two flops per weight, so its floor is the weight bytes over HBM bandwidth.
These kernels give each program `BLOCK_N` output features and stream their weight rows
with 16-byte loads, and fold in whatever computes the input vector, so it never makes
a trip through memory of its own. For one row on a GPU the large projections run as a
persistent launch (a few programs per SM, each computing the input vector once and
walking many tiles); otherwise each program owns one tile:

- `plain`:      y = W x
- `norm`:       y = W rmsnorm(x)                         (the first layer's input norm)
- `add_norm`:   y = W rmsnorm(x + residual); residual' = x + residual
- `silu_mul`:   y = W (silu(gate) * up) for x = [gate | up]

The input ops round exactly like the unfused kernels in triton_ops.py (and transformers),
and accumulate in float32. Rows (sequences) are the grid's first axis, so the programs of
one weight tile run side by side and share it through L2 (yet cuBLAS wins from 2 rows on).
On Hopper each program issues its first weight loads before waiting for the kernel ahead
of it to finish (programmatic dependent launch, triton_pdl.py): weights never depend on it
(tiles pipelined through shared memory, `GemvConfig.stages`, load after the wait).

Weights in FP8 (e4m3, a float32 scale per row) use the same kernels; their launch is not a
heuristic but tuned per shape on first use (`fp8_config`), among tiles, pipelined tiles,
persistent launches and, for one row on Hopper, tiles fetched by the tensor memory
accelerator (triton_gemv_tma.py; `fp8_candidates`).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from kvflow.engines.native.fp8 import fp8_weights_like, scale_of
from kvflow.engines.native.triton_gemv_parts import (
    ADD_NORM,
    NORM,
    PLAIN,
    SILU_MUL,
    GemvConfig,
    input_chunk,
    inv_rms,
    num_sms,
)
from kvflow.engines.native.triton_gemv_tma import FP8_TMA, gemv_tma, tma_fits
from kvflow.engines.native.triton_pdl import PDL, gdc_launch_dependents, gdc_wait, launch_options

__all__ = ["ADD_NORM", "FP8_TILES", "FP8_TMA", "MAX_ROWS", "NORM", "PLAIN", "SILU_MUL", "GemvConfig",
           "fp8_candidates", "fp8_config", "gemv", "gemv_config", "tma_fits"]

log = logging.getLogger(__name__)

MAX_ROWS = 1  # measured on H200: from 2 rows on, cuBLAS beats re-reading tiles from L2


def gemv_config(n: int, k: int, num_sms: int = 0) -> GemvConfig:
    """The launch for an N x K weight; persistent for one row where `num_sms` is known.

    From sweeps on H200 (bench/native_gemv.py, 1.1B Llama shapes): persistent launches
    keep the input in registers and cut the tail: down (K = 8192) 2 rows x 2 programs per
    SM, 12.2 -> 10.3 us; q/k/v, gate/up and LM head 4 rows x 4 programs per SM (gate/up
    21.3 -> 19.1 us). Tiled: 8 x 1024 for K = 2048; 4 x 2048 where 8-row tiles would leave
    too few programs: o_proj (N = 2048) and down (K = 8192, with 8 warps).
    """
    if num_sms and k >= 4096:
        return GemvConfig(2, k, num_warps=8, programs=2 * num_sms)
    if num_sms and n > 2048:
        return GemvConfig(4, k, num_warps=4, programs=4 * num_sms)
    if k >= 4096:
        return GemvConfig(4, 2048, num_warps=8)
    if n <= 2048:
        return GemvConfig(4, min(triton.next_power_of_2(k), 2048), num_warps=4)
    block_k = min(triton.next_power_of_2(k), 1024)
    block_n = max(1, min(8192 // block_k, triton.next_power_of_2(n)))
    return GemvConfig(block_n, block_k, num_warps=4)


@triton.jit
def _weight_chunk(w_rows, n_mask, k0, K, BLOCK_K: tl.constexpr):
    """Weight columns k0 .. k0 + BLOCK_K of this program's rows; streamed once, so not cached."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = n_mask[:, None] & (offs_k < K)[None, :]
    return tl.load(w_rows + offs_k[None, :], mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def _chunk_product(w, x_row, r_row, r_out_row, nw_ptr, k0, K, inv, write_residual,
                   PROLOGUE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight chunk's rows times the input's elements k0 .. k0 + BLOCK_K, summed per row."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    h = input_chunk(x_row, r_row, r_out_row, nw_ptr, offs_k, offs_k < K, K, inv, write_residual,
                     PROLOGUE)
    return tl.sum(w.to(tl.float32) * h[None, :], 1)


@triton.jit
def _gemv_kernel(
    x_ptr, r_ptr, r_out_ptr, nw_ptr, w_ptr, b_ptr, s_ptr, y_ptr,
    N, K, stride_xm, stride_rm, stride_rom, stride_wn, stride_ym, eps,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    STAGES: tl.constexpr = 0,
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_row = x_ptr + row * stride_xm
    r_row = r_ptr + row * stride_rm
    r_out_row = r_out_ptr + row * stride_rom
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if not STAGES:  # one chunk prefetched in registers, the first while the last kernel ends
        w_next = _weight_chunk(w_rows, n_mask, 0, K, BLOCK_K)
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()  # from here on, the inputs the kernels before wrote are visible
    inv = 1.0
    if PROLOGUE == 1 or PROLOGUE == 2:
        inv = inv_rms(x_row, r_row, K, eps, PROLOGUE, BLOCK_K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    if STAGES:  # Triton's software pipeline: STAGES - 1 weight chunks in flight through shared memory
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            w = _weight_chunk(w_rows, n_mask, k0, K, BLOCK_K)
            acc += _chunk_product(w, x_row, r_row, r_out_row, nw_ptr, k0, K, inv, pid_n == 0,
                                  PROLOGUE, BLOCK_K)
    else:
        for k0 in range(0, K, BLOCK_K):
            w = w_next
            w_next = _weight_chunk(w_rows, n_mask, k0 + BLOCK_K, K, BLOCK_K)  # prefetch (masked)
            acc += _chunk_product(w, x_row, r_row, r_out_row, nw_ptr, k0, K, inv, pid_n == 0,
                                  PROLOGUE, BLOCK_K)
    if HAS_SCALE:  # an FP8 weight's per-row scale
        acc *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = acc.to(dtype).to(y_ptr.dtype.element_ty)  # rounded like a model-dtype matmul
    tl.store(y_ptr + row * stride_ym + offs_n, out, mask=n_mask)


@triton.jit
def _weight_tile(w_ptr, rows, N, offs_k, k_mask, stride_wn):
    mask = (rows < N)[:, None] & k_mask[None, :]
    ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def _gemv_persistent_kernel(
    x_ptr, r_ptr, r_out_ptr, nw_ptr, w_ptr, b_ptr, s_ptr, y_ptr, N, K, stride_wn, eps,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One row: the input vector (with its prologue) once per program, then tiles
    pid, pid + P, ... of BLOCK_N output features, each tile prefetched a turn ahead."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dtype = x_ptr.dtype.element_ty
    offs_k = tl.arange(0, K_PAD)
    k_mask = offs_k < K
    offs_n = tl.arange(0, BLOCK_N)
    w_next = _weight_tile(w_ptr, pid * BLOCK_N + offs_n, N, offs_k, k_mask, stride_wn)
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    inv = 1.0
    if PROLOGUE == 1 or PROLOGUE == 2:
        inv = inv_rms(x_ptr, r_ptr, K, eps, PROLOGUE, K_PAD)
    h = input_chunk(x_ptr, r_ptr, r_out_ptr, nw_ptr, offs_k, k_mask, K, inv, pid == 0, PROLOGUE)
    for tile in range(pid, tl.cdiv(N, BLOCK_N), nprog):
        w = w_next
        w_next = _weight_tile(w_ptr, (tile + nprog) * BLOCK_N + offs_n, N, offs_k, k_mask,
                              stride_wn)
        rows = tile * BLOCK_N + offs_n
        acc = tl.sum(w.to(tl.float32) * h[None, :], 1)
        if HAS_SCALE:
            acc *= tl.load(s_ptr + rows, mask=rows < N, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, acc.to(dtype).to(y_ptr.dtype.element_ty), mask=rows < N)


# FP8-weight GEMV launches to choose from, timed once per weight shape (`fp8_config`): the
# bf16 heuristics above were swept on 1.1B shapes with 2-byte weights and leave an FP8 GEMV
# far from the bandwidth floor on 8B shapes (first H200 run: 1 TB/s).
FP8_TILES = (GemvConfig(8, 1024, 4), GemvConfig(16, 512, 4), GemvConfig(16, 1024, 8),
             GemvConfig(32, 512, 8), GemvConfig(8, 2048, 8),
             # pipelined through shared memory: on H200 the 8B gate/up projection at 3.1 TB/s
             # instead of 2.6 (the register prefetch keeps too few bytes in flight at the
             # occupancy its registers allow); slower on the others, which the tuning sees
             GemvConfig(16, 512, 4, stages=3), GemvConfig(32, 512, 8, stages=3))
_fp8_tuned: dict[tuple[torch.device, int, int, int, bool, bool], GemvConfig] = {}


def fp8_candidates(k: int, num_sms: int, tma: bool = False) -> list[GemvConfig]:
    """The tiles, and for one row on a GPU (`num_sms` > 0) persistent launches where the input
    row fits in registers (K <= 8192) and, where `tma` (Hopper or newer), the TMA tiles."""
    out = list(FP8_TILES)
    if num_sms and k <= 8192:
        out += [GemvConfig(4, k, 4, 4 * num_sms), GemvConfig(2, k, 8, 2 * num_sms)]
    if num_sms and tma:
        out += FP8_TMA
    return out


def fp8_config(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, prologue: int,
               **kw: object) -> GemvConfig:
    """The fastest of `fp8_candidates` for this (device, N, K, prologue, one row?, TMA fits?),
    timed on first use outside a CUDA graph capture (the graphs' warm-up forwards run first); during a
    capture before any timing, the first candidate. Each candidate is timed as a decode step
    runs it: over the FP8 weights of this shape (one per layer, `fp8.fp8_weights_like`; up to
    64 of them), each read once, replayed from a CUDA graph (a single weight that fits in L2
    would be timed from it, and launches timed from Python would measure the host). A
    candidate that does not compile or fit on this GPU is left out (logged)."""
    n, k = weight.shape
    tma = tma_fits(weight)
    key = (x.device, n, k, prologue, x.shape[0] == 1, tma)
    if key in _fp8_tuned:
        return _fp8_tuned[key]
    candidates = fp8_candidates(k, num_sms(x.device) if x.shape[0] == 1 else 0, tma=tma)
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    peers = [(w, scale_of(w)) for w in fp8_weights_like(weight)][:64] or [(weight, scale)]
    best, best_ms = candidates[0], float("inf")
    for cfg in candidates:
        def sweep(cfg: GemvConfig = cfg) -> None:
            for w, s in peers:
                gemv(x, w, prologue=prologue, scale=s, config=cfg, **kw)  # type: ignore[arg-type]

        try:
            sweep()  # compiles, outside the capture
        except Exception as exc:  # e.g. out of shared memory or registers on a smaller GPU
            log.info("FP8 GEMV launch %s left out for %dx%d: %s", cfg, n, k, exc)
            continue
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            sweep()
        ms = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            ms = min(ms, start.elapsed_time(end))
        del graph
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best_ms == float("inf"):
        raise RuntimeError(f"no FP8 GEMV launch compiles for a {n}x{k} weight on this GPU (see the log)")
    _fp8_tuned[key] = best
    return best


def gemv(
    x: torch.Tensor, weight: torch.Tensor, *, prologue: int = PLAIN,
    residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
    eps: float = 0.0, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
    config: GemvConfig | None = None, pdl: bool = PDL, scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y [M, N], the new residual for ADD_NORM else None); x is [M, K] ([M, 2K] for SILU_MUL).
    `scale` (float32 [N]): the weight is FP8 and row n of it stands for weight[n] * scale[n]."""
    rows = x.shape[0]
    n, k = weight.shape
    assert weight.stride(1) == 1 and x.stride(-1) == 1, "gemv needs rows contiguous along K"
    assert x.shape[1] == (2 * k if prologue == SILU_MUL else k)
    y = torch.empty(rows, n, dtype=out_dtype or x.dtype, device=x.device)
    r_in = residual if residual is not None else x
    r_out = torch.empty_like(x) if prologue == ADD_NORM else x
    if config is None and scale is not None and x.is_cuda:
        config = fp8_config(x, weight, scale, prologue, residual=residual,
                            norm_weight=norm_weight, eps=eps, bias=bias, out_dtype=out_dtype,
                            pdl=pdl)
    cfg = config or gemv_config(n, k, num_sms(x.device) if rows == 1 else 0)
    if cfg.splits:
        assert scale is not None, "the TMA GEMV takes an FP8 weight"
        gemv_tma(x, weight, scale, y, r_in, r_out, norm_weight, bias, prologue, eps, cfg, pdl)
        return y, (r_out if prologue == ADD_NORM else None)
    if cfg.programs:
        assert rows == 1, "the persistent GEMV takes one row"
        _gemv_persistent_kernel[(cfg.programs,)](
            x, r_in, r_out, norm_weight if norm_weight is not None else weight,
            weight, bias if bias is not None else weight, scale if scale is not None else weight,
            y, n, k, weight.stride(0), eps,
            PROLOGUE=prologue, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
            BLOCK_N=cfg.block_n,
            K_PAD=triton.next_power_of_2(k), USE_PDL=pdl, num_warps=cfg.num_warps,
            **launch_options(pdl),
        )
        return y, (r_out if prologue == ADD_NORM else None)
    _gemv_kernel[(rows, triton.cdiv(n, cfg.block_n))](
        x, r_in, r_out, norm_weight if norm_weight is not None else weight,
        weight, bias if bias is not None else weight, scale if scale is not None else weight, y,
        n, k, x.stride(0), r_in.stride(0), r_out.stride(0), weight.stride(0), y.stride(0), eps,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_PDL=pdl, STAGES=cfg.stages,
        num_warps=cfg.num_warps,
        **launch_options(pdl),
    )
    return y, (r_out if prologue == ADD_NORM else None)
