"""Fused Triton kernels for the model's work on GPU: add + RMSNorm, RoPE in place, silu * up, decode GEMVs,
and the one that feeds the last step's sampled ids into the next step's inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvflow.engines.native import triton_gemv as tg
from kvflow.engines.native.fp8 import scale_of
from kvflow.engines.native.ops import Projected, TorchOps, register_ops
from kvflow.engines.native.triton_fp8 import fp8_linear
from kvflow.engines.native.triton_pdl import PDL, gdc_launch_dependents, gdc_wait, launch_options


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # triton_pdl.py: start early, wait for the kernel ahead
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(dtype)  # rounded like an add in the model dtype
        tl.store(res_ptr + row * stride_r + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = ((x * inv).to(dtype).to(tl.float32) * w).to(dtype)
    tl.store(out_ptr + row * stride_o + offs, y, mask=mask)


@triton.jit
def _rope_heads(base, cos, sin, offs, heads, num_heads, stride_h, HALF):
    mask = (heads[:, None] < num_heads) & (offs[None, :] < HALF)
    ptr = base + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_table,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # triton_pdl.py: start early, wait for the kernel ahead
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    offs = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + pos * stride_table + offs, mask=offs < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + offs, mask=offs < HALF, other=0.0)[None, :]
    heads = tl.arange(0, HEADS_PAD)
    _rope_heads(q_ptr + t * stride_qt, cos, sin, offs, heads, num_q_heads, stride_qh, HALF)
    _rope_heads(k_ptr + t * stride_kt, cos, sin, offs, heads, num_k_heads, stride_kh, HALF)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)  # silu rounded, then the product
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(dtype), mask=mask)


@triton.jit
def _chain_ids_kernel(ids_ptr, src_ptr, sampled_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(src_ptr + offs, mask=offs < n, other=-1)
    chained = src >= 0
    token = tl.load(sampled_ptr + tl.maximum(src, 0), mask=chained, other=0)
    tl.store(ids_ptr + offs, token, mask=chained)


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty_like(x2)
    res = residual.view(-1, shape[-1]) if residual is not None else x2
    n = shape[-1]
    _rms_norm_kernel[(x2.shape[0],)](
        x2, res, weight, out, x2.stride(0), res.stride(0), out.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
        num_warps=8 if n >= 4096 else 4, USE_PDL=PDL, **launch_options(),
    )
    return out.view(shape)


def _few_rows(x: torch.Tensor) -> bool:
    """Decode-sized: few enough rows that a GEMV beats a matrix-matrix product."""
    return x.shape[0] <= tg.MAX_ROWS and x.stride(-1) == 1


@register_ops("triton")
class TritonOps(TorchOps):
    """One kernel per operation; `add_rms_norm` and `rope` work in place.

    Projections of up to `triton_gemv.MAX_ROWS` rows run as GEMVs with the input's norm or
    activation folded in (one launch instead of two); bigger ones go to cuBLAS.
    """

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _norm(x, None, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Overwrites `residual` with x + residual."""
        return _norm(x, residual, weight, eps), residual

    def rope(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q and k in place (they may be strided views of the fused qkv output)."""
        half = q.shape[-1] // 2
        _rope_kernel[(q.shape[0],)](
            q, k, positions, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
            q.shape[1], k.shape[1],
            HALF=half, HALF_PAD=triton.next_power_of_2(half),
            HEADS_PAD=triton.next_power_of_2(max(q.shape[1], k.shape[1])),
            num_warps=4, USE_PDL=PDL, **launch_options(),
        )
        return q, k

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        n = gate_up.shape[-1] // 2
        x = gate_up.reshape(-1, 2 * n)
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        block = 1024
        _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](
            x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=4,
        )
        return out.view(*gate_up.shape[:-1], n)

    fp8_compute = True

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        """cuBLAS, or for an FP8 weight (fp8.py) FP8 tensor cores with per-row scales."""
        scale = scale_of(weight)
        if scale is None:
            return F.linear(x, weight, bias)
        return fp8_linear(x, weight, scale, bias)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not _few_rows(x):
            return self.matmul(x, weight)
        return tg.gemv(x, weight, scale=scale_of(weight))[0]

    def norm_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
        eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
    ) -> Projected:
        """With a residual, the new residual is a fresh tensor (programs read the old one)."""
        if not _few_rows(x):
            return super().norm_linear(x, residual, norm_weight, eps, weight, bias)
        prologue = tg.NORM if residual is None else tg.ADD_NORM
        out, summed = tg.gemv(x, weight, prologue=prologue, residual=residual,
                              norm_weight=norm_weight, eps=eps, bias=bias,
                              scale=scale_of(weight))
        return Projected(out, x if summed is None else summed)

    def silu_mul_linear(self, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not _few_rows(gate_up):
            return super().silu_mul_linear(gate_up, weight)
        return tg.gemv(gate_up, weight, prologue=tg.SILU_MUL, scale=scale_of(weight))[0]

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not _few_rows(x):
            return super().logits(x, weight)
        return tg.gemv(x, weight, out_dtype=torch.float32)[0]

    def chain_ids(self, ids: torch.Tensor, src_rows: torch.Tensor, sampled: torch.Tensor) -> None:
        n = ids.shape[0]
        assert ids.stride(0) == 1 and src_rows.stride(0) == 1 and sampled.stride(0) == 1
        # one BLOCK for every n: a BLOCK per power of two compiled anew for each new step size,
        # up to half a second on the first request of that size
        _chain_ids_kernel[(triton.cdiv(n, 1024),)](ids, src_rows, sampled, n, BLOCK=1024,
                                                   num_warps=4)
