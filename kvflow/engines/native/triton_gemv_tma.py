"""The FP8-weight GEMV for one row on Hopper whose weight tiles the tensor memory accelerator fetches.

Each program (output tile, K split) has whole weight tiles of BLOCK_N rows x BLOCK_K bytes
copied to shared memory through a tensor descriptor, STAGES - 1 ahead, so few registers hold
the bytes in flight (the register-prefetching tiles of triton_gemv.py run out of registers
first); the products gather in a 2-D accumulator summed across K once, after the loop. K may
be split over programs: each stores its partial sums, and the last of a tile's programs to
finish (a counter per tile) adds them in split order, so the sum does not depend on timing.
The partial sums and counters belong to the weight (`_split_workspace`). Chosen by the FP8
launch tuning (triton_gemv.fp8_config) where `tma_fits`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvflow.engines.native.triton_gemv_parts import GemvConfig, input_chunk, inv_rms
from kvflow.engines.native.triton_pdl import gdc_launch_dependents, gdc_wait, launch_options

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.3: no tensor descriptors, no TMA launches
    TensorDescriptor = None  # type: ignore[assignment,misc]


@triton.jit
def _gemv_tma_kernel(
    x_ptr, r_ptr, r_out_ptr, nw_ptr, w_desc, b_ptr, s_ptr, y_ptr, part_ptr, count_ptr, N, K, eps,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr, SPLITS: tl.constexpr, USE_PDL: tl.constexpr, RMS_BLOCK: tl.constexpr,
):
    """One row, FP8 weight: program (tile, split) sums its share of K for BLOCK_N outputs, its
    weight tiles loaded through the tensor descriptor `w_desc`, STAGES - 1 in flight. With
    SPLITS > 1 each program stores its partial sums; the last of a tile's programs (a counter
    per tile, reset by it for the next launch) adds them in split order, so the result does
    not depend on which finished first."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    inv = 1.0
    if PROLOGUE == 1 or PROLOGUE == 2:  # wide chunks: few round trips before the first tile
        inv = inv_rms(x_ptr, r_ptr, K, eps, PROLOGUE, RMS_BLOCK)
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLITS) * BLOCK_K
    k_lo = pid_s * k_per
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # summed across K once, after the loop
    for k0 in tl.range(k_lo, tl.minimum(k_lo + k_per, K), BLOCK_K, num_stages=STAGES):
        w = w_desc.load([pid_n * BLOCK_N, k0])  # out of bounds reads as zero
        offs_k = k0 + tl.arange(0, BLOCK_K)
        h = input_chunk(x_ptr, r_ptr, r_out_ptr, nw_ptr, offs_k, offs_k < K, K, inv, pid_n == 0,
                         PROLOGUE)
        acc += w.to(tl.float32) * h[None, :]
    total = tl.sum(acc, 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    last = True
    if SPLITS > 1:
        tl.store(part_ptr + pid_s * N + offs_n, total, mask=n_mask)
        tl.debug_barrier()  # every thread's partial sums stored before the counter's release
        last = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == SPLITS - 1
        if last:
            total = tl.zeros([BLOCK_N], tl.float32)
            for s in range(SPLITS):
                total += tl.load(part_ptr + s * N + offs_n, mask=n_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(count_ptr + pid_n, 0)
    if last:
        total *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
        if HAS_BIAS:
            total += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, total.to(dtype).to(y_ptr.dtype.element_ty), mask=n_mask)


# The launches the tuning tries: on the H200 (bench/fp8_gemv_gpu.py --rows 1, 8B shapes, µs
# against the best of triton_gemv's own launches) gate/up + add·norm 34.5 vs 37.2 (64 x 256,
# whole K), down + silu·mul 18.1 vs 23.5 (64 x 256, K in 4), qkv + add·norm 11.1 vs 12.5
# (64 x 256, K in 2); o 7.1 vs 7.0 (so it keeps its own).
FP8_TMA = tuple(GemvConfig(n, 256, 4, stages=3, splits=sp) for n in (32, 64) for sp in (1, 2, 4))


def tma_fits(weight: torch.Tensor) -> bool:
    """The TMA launches can take this weight: Triton with tensor descriptors, an NVIDIA sm_90+
    GPU (or Triton's interpreter, for tests on a CPU), and rows that start on 16-byte
    boundaries (as a descriptor needs)."""
    aligned = weight.data_ptr() % 16 == 0 and (weight.stride(0) * weight.element_size()) % 16 == 0
    return aligned and _tma_device(weight.device)


@functools.cache
def _tma_device(device: torch.device) -> bool:
    """Whether TMA launches run on `device` (asked once per device: the tuning asks per call)."""
    if TensorDescriptor is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and knobs.runtime.interpret:
        return True
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _split_workspace(weight: torch.Tensor, cfg: GemvConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's partial sums [splits, N] (float32) and per-tile counters (zero between
    launches), kept on the weight itself so they live and go with it: two launches on one
    weight never overlap (a step's kernels run one after another on the engine's stream,
    each waiting for the one before, PDL or not). Grown when a launch needs more; made on the
    weight's first split launch, which the tuning runs outside any CUDA graph capture."""
    n = weight.shape[0]
    tiles = triton.cdiv(n, cfg.block_n)
    held: tuple[torch.Tensor, torch.Tensor] | None = getattr(weight, "gemv_split_workspace", None)
    if held is None or held[0].shape[0] < cfg.splits or held[1].numel() < tiles:
        held = (torch.empty(cfg.splits, n, dtype=torch.float32, device=weight.device),
                torch.zeros(tiles, dtype=torch.int32, device=weight.device))
        weight.gemv_split_workspace = held  # type: ignore[attr-defined]
    return held


def gemv_tma(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, y: torch.Tensor,
             r_in: torch.Tensor, r_out: torch.Tensor, norm_weight: torch.Tensor | None,
             bias: torch.Tensor | None, prologue: int, eps: float, cfg: GemvConfig,
             pdl: bool) -> None:
    """y[0] = the FP8 weight (row-scaled) times the input op of x[0] (triton_gemv.gemv's
    arguments, its buffers made); r_out gets the new residual for ADD_NORM."""
    assert x.shape[0] == 1 and tma_fits(weight), "the TMA GEMV takes one row, an aligned FP8 weight"
    n, k = weight.shape
    part, count = _split_workspace(weight, cfg) if cfg.splits > 1 else (scale, scale)
    _gemv_tma_kernel[(triton.cdiv(n, cfg.block_n), cfg.splits)](
        x, r_in, r_out, norm_weight if norm_weight is not None else weight,
        TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]),
        bias if bias is not None else scale, scale, y, part, count, n, k, eps,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        STAGES=cfg.stages, SPLITS=cfg.splits, USE_PDL=pdl,
        RMS_BLOCK=min(triton.next_power_of_2(k), 8192), num_warps=cfg.num_warps,
        **launch_options(pdl),
    )
