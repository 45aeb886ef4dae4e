"""What the GEMV kernels share: the launch config, the input ops' codes and their fused code.

The input ops round exactly like the unfused kernels in triton_ops.py (and transformers),
and accumulate in float32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

PLAIN, NORM, ADD_NORM, SILU_MUL = 0, 1, 2, 3  # the input op fused into a GEMV ("prologue")


@functools.cache
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (0 elsewhere)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class GemvConfig:
    """One launch's tile: output features per program, the K chunk, warps per program.

    `programs` > 0: a persistent launch of that many programs, each computing the whole
    input vector once (block_k is then all of K) and walking every programs-th tile.
    `stages` > 0 (tiled): the loop over K is software-pipelined with that many stages (weight
    chunks staged through shared memory) instead of one chunk prefetched in registers.
    `splits` > 0: the TMA kernel (triton_gemv_tma.py), `stages` deep, each output tile's K
    cut in `splits`."""

    block_n: int
    block_k: int
    num_warps: int
    programs: int = 0
    stages: int = 0
    splits: int = 0  # > 0: the TMA kernel (one row, Hopper), K split over that many programs


@triton.jit
def input_chunk(
    x_row, r_row, r_out_row, nw_ptr, offs_k, k_mask, K, inv, write_residual,
    PROLOGUE: tl.constexpr,
):
    """The input vector's elements `offs_k` in float32, rounded to the model dtype."""
    dtype = x_row.dtype.element_ty
    x = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    if PROLOGUE == 3:  # silu(gate) * up
        up = tl.load(x_row + K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        act = (x * tl.sigmoid(x)).to(dtype).to(tl.float32)
        return (act * up).to(dtype).to(tl.float32)
    if PROLOGUE == 2:
        r = tl.load(r_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        summed = (x + r).to(dtype)
        tl.store(r_out_row + offs_k, summed, mask=k_mask & write_residual)
        x = summed.to(tl.float32)
    if PROLOGUE == 1 or PROLOGUE == 2:
        w = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        return ((x * inv).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)
    return x


@triton.jit
def inv_rms(x_row, r_row, K, eps, PROLOGUE: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / rms of the (x + residual) row, rounded like the model adds it."""
    dtype = x_row.dtype.element_ty
    total = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if PROLOGUE == 2:
            r = tl.load(r_row + offs, mask=mask, other=0.0).to(tl.float32)
            x = (x + r).to(dtype).to(tl.float32)
        total += x * x
    return tl.rsqrt(tl.sum(total, 0) / K + eps)
