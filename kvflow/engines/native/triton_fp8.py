"""FP8 matmuls of many rows (prefill, larger decode batches) on FP8 tensor cores.

The weight is float8_e4m3fn [N, K] with a float32 scale per row (fp8.py). The activations are
quantised per row on the fly (one Triton program per row: its max |x| over K, then x / s in
e4m3 with s = max / 448), and `torch._scaled_mm` multiplies the two with row-wise scales:
y[m, n] = s_x[m] * s_w[n] * sum_k q_x[m, k] q_w[n, k], accumulated in float32 and rounded to
the model dtype. Single rows go to the FP8-weight GEMV instead (triton_gemv.py), which keeps
the activations in bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.engines.native.fp8 import FP8, FP8_MAX


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, FP8_LIMIT: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    q_row = q_ptr + row.to(tl.int64) * stride_q
    peak = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.abs(x))
    scale = tl.maximum(tl.max(peak, 0) / FP8_LIMIT, 1e-12)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -FP8_LIMIT, FP8_LIMIT)
        tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] float8_e4m3fn, s [M, 1] float32) with x ~= q * s row by row."""
    assert x.dim() == 2 and x.stride(-1) == 1
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=FP8, device=x.device)
    s = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block = min(triton.next_power_of_2(k), 4096)
        _quantize_rows_kernel[(rows,)](x, q, s, k, x.stride(0), q.stride(0), FP8_LIMIT=FP8_MAX,
                                       BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return q, s


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (model dtype) times an FP8 weight [N, K] with per-row `scale` [N], + bias."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q, s = quantize_rows(x2)
    out = torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=scale.view(1, -1),
                           out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*shape[:-1], weight.shape[0])
