"""Batch-invariant matmul on CUDA (`--batch-invariant`): every output element is reduced over K
in an order that the weight's shape fixes, whatever the number of rows.

A library GEMM picks its split-K (and tiling) from the whole problem's shape, so a row rounds
differently in a batch of 1 than in a batch of 64 or a prefill of 8000. Here one Triton
kernel serves every row count, and what fixes a row's bits is fixed per weight:

- K is cut into `splits` ranges of `k_split` elements (`k_ranges`: from the weight's shape
  and the GPU's SM count only). Each range is summed from zero by tensor-core dots of
  BLOCK_K columns in K order; the ranges' float32 sums are then added in order, from zero:
  ((0 + part_0) + part_1) + ...
- Few rows (decode): each range is its own program, so a batch of one still spreads the
  weight over the GPU; a second kernel adds the partial sums in order. Many rows (prefill):
  one program walks all the ranges and adds them in registers. The arithmetic is the same.
- The tile (rows and columns per program, warps) follows the row count: FEW for decode,
  MANY for prefill. A tensor-core dot computes each output element from its own row and
  column whatever the tile around it, so the tile does not change the bits; the GPU tests
  check this on every launch pair (test_triton_invariant.py), and on the H200 it held for
  every tile tried (64x64 to 256x128, 4 or 8 warps, 3 or 4 stages, on the 8B shapes;
  `bench/invariant_gpu.py --gemm-table` checks it per projection).

Results are invariant on one GPU model, not across models (the ranges follow the SM count).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvflow.engines.native.triton_decode import precision
from kvflow.engines.native.triton_gemv_parts import num_sms


class KRanges(NamedTuple):
    """How one N x K weight's K is cut: `splits` ranges of `k_split` elements (the last may
    be shorter), each a multiple of BLOCK_K. Fixed by the weight's shape and the GPU."""

    splits: int
    k_split: int


@dataclass(frozen=True)
class Tiling:
    """One launch's tile: rows and output columns per program, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    stages: int


BLOCK_K = 64  # columns of K per tensor-core dot (each dot runs its 16-wide steps in K order)
MAX_SPLITS = 8
# Decode-sized steps: each K range its own program. Prefill-sized: the ranges in one loop.
# On the H200, 8B shapes: FEW's GEMMs take 4.16 ms a step at one row (the best of five tiles),
# MANY's 264 ms for an 8192-token prefill (the best of five; cuBLAS 159 ms). Those came from a
# graph-timed probe (issue 18's session-9 note) that `bench/invariant_gpu.py --gemm-table` now
# carries, per projection against cuBLAS.
FEW = Tiling(64, 128, 4, 4)
MANY = Tiling(128, 256, 8, 3)


def k_ranges(n: int, k: int, sms: int) -> KRanges:
    """Enough (FEW output tile, K range) programs for a one-row step to cover the GPU twice,
    up to MAX_SPLITS ranges of at least 8 chunks each."""
    tiles = triton.cdiv(n, FEW.block_n)
    chunks = triton.cdiv(k, BLOCK_K)
    splits = 1
    while tiles * splits < 2 * sms and splits < MAX_SPLITS and chunks >= 16 * splits:
        splits *= 2
    k_split = triton.cdiv(chunks, splits) * BLOCK_K
    return KRanges(triton.cdiv(k, k_split), k_split)


def tiling(m: int, n: int, sms: int) -> Tiling:
    """MANY where its output tiles alone cover the GPU twice, else FEW."""
    many = triton.cdiv(m, MANY.block_m) * triton.cdiv(n, MANY.block_n) >= 2 * sms
    return MANY if many else FEW


def fit_stages(tile: Tiling, smem: int | None, elem_bytes: int) -> Tiling:
    """`tile` with fewer pipeline stages where its staged x and weight chunks would not fit
    `smem` bytes of shared memory (GPUs smaller than Hopper's; None: unknown, as it is).
    The stages only pace the loads: they do not change the bits."""
    stages = tile.stages
    per_stage = (tile.block_m + tile.block_n) * BLOCK_K * elem_bytes
    while smem is not None and stages > 1 and stages * per_stage > smem:
        stages -= 1
    return tile if stages == tile.stages else dataclasses.replace(tile, stages=stages)


# `tl.range(..., flatten=True)` (Triton 3.3+) pipelines the loads across the ranges' loops;
# without it each range's loop fills and drains its own pipeline.
FLATTEN = "flatten" in inspect.signature(tl.range).parameters


def _smem(device: torch.device) -> int | None:
    """Shared memory a block may opt in to, where this PyTorch reports it (None off CUDA)."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


@triton.jit
def _range_sum(x_ptr, w_ptr, rows, cols, M, N, k0, k1, stride_xm, stride_wn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               STAGES: tl.constexpr, PRECISION: tl.constexpr):
    """float32 [BLOCK_M, BLOCK_N]: x[rows, k0:k1] @ w[cols, k0:k1].T, from zero, in K order."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # int64: N x K may pass 2^31
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    for k in tl.range(k0, k1, BLOCK_K, num_stages=STAGES):
        offs = k + tl.arange(0, BLOCK_K)
        k_ok = offs < k1
        a = tl.load(x_rows + offs[None, :], mask=row_ok & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + offs[:, None], mask=col_ok & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


# The row count only feeds masks and offsets: one compile serves every count (else Triton
# would compile again for counts of 1, of multiples of 16 and of the rest).
@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    x_ptr, w_ptr, out_ptr, part_ptr, M, N, K, k_split, stride_xm, stride_wn, stride_om,
    SPLITS: tl.constexpr, IN_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, FLATTEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    out_at = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if IN_PROGRAM:
        total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if FLATTEN:
            for s in tl.range(0, SPLITS, flatten=True):
                k0 = s * k_split
                total += _range_sum(x_ptr, w_ptr, rows, cols, M, N, k0, tl.minimum(k0 + k_split, K),
                                    stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, PRECISION)
        else:
            for s in tl.static_range(SPLITS):
                k0 = s * k_split
                total += _range_sum(x_ptr, w_ptr, rows, cols, M, N, k0, tl.minimum(k0 + k_split, K),
                                    stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, PRECISION)
        tl.store(out_ptr + out_at, total.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        s = tl.program_id(2)
        k0 = s * k_split
        part = _range_sum(x_ptr, w_ptr, rows, cols, M, N, k0, tl.minimum(k0 + k_split, K),
                          stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, PRECISION)
        tl.store(part_ptr + (s * M + rows.to(tl.int64)[:, None]) * N + cols[None, :], part, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _sum_ranges_kernel(part_ptr, out_ptr, M, N, stride_om, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[row] = ((0 + part_0[row]) + part_1[row]) + ..., as _matmul_kernel's IN_PROGRAM adds."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    total = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLITS):
        total += tl.load(part_ptr + (s * M + row) * N + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


def invariant_matmul(x: torch.Tensor, weight: torch.Tensor, tile: Tiling | None = None,
                     in_program: bool | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T in x's dtype, each row's bits independent of M.
    `tile` and `in_program` force a launch (tests); None picks them by the row count."""
    assert x.dim() == 2 and x.stride(-1) == 1 and weight.stride(-1) == 1
    m, k = x.shape
    n = weight.shape[0]
    sms = num_sms(x.device) or 8  # (the interpreter: any count)
    ranges = k_ranges(n, k, sms)
    tile = fit_stages(tile or tiling(m, n, sms), _smem(x.device), x.element_size())
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    inside = (tile.block_m == MANY.block_m) if in_program is None else in_program
    inside = inside or ranges.splits == 1
    grid = (triton.cdiv(n, tile.block_n), triton.cdiv(m, tile.block_m), 1 if inside else ranges.splits)
    part = out if inside else torch.empty(ranges.splits, m, n, dtype=torch.float32, device=x.device)
    _matmul_kernel[grid](
        x, weight, out, part, m, n, k, ranges.k_split, x.stride(0), weight.stride(0), out.stride(0),
        SPLITS=ranges.splits, IN_PROGRAM=inside, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=BLOCK_K, STAGES=tile.stages, FLATTEN=FLATTEN, PRECISION=precision(x),
        num_warps=tile.num_warps,
    )
    if not inside:
        block = 1024
        _sum_ranges_kernel[(m, triton.cdiv(n, block))](
            part, out, m, n, out.stride(0), SPLITS=ranges.splits, BLOCK=block, num_warps=4)
    return out
