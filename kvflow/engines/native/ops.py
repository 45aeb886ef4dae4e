"""The model's operations besides attention (norms, projections, rotary embedding, SwiGLU), by name.

"torch" is plain PyTorch and runs anywhere. "triton" fuses each operation into one GPU
kernel (add + norm, rotary on q and k in place, silu * up), and for steps of a few rows
(decode) folds the norm or the activation into the projection that reads it (a Triton
GEMV), which matters for decode steps made of hundreds of tiny launches. Both compute in
float32 and round like transformers does, so they agree to the last bit in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from kvflow.engines.native.fp8 import dequantize, scale_of


class Projected(NamedTuple):
    """A projection of the normed residual stream, and the stream (x + residual) itself."""

    out: torch.Tensor
    residual: torch.Tensor


class Ops(Protocol):
    fp8_compute: bool  # matmul takes FP8 weights with per-row scales as they are

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)."""
        ...

    def rope(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half RoPE on q [T, H, D] and k [T, KVH, D]; tables [positions, D/2] float32."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up = [gate | up] along the last dim."""
        ...

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T for x [T, K], weight [N, K]."""
        ...

    def norm_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
        eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
    ) -> Projected:
        """linear(norm(x + residual)) and x + residual; residual None: linear(norm(x)) and x."""
        ...

    def silu_mul_linear(self, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """linear(silu(gate) * up)."""
        ...

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """linear(x) rounded to the model dtype, as float32."""
        ...

    def chain_ids(self, ids: torch.Tensor, src_rows: torch.Tensor, sampled: torch.Tensor) -> None:
        """In place, ids[i] = sampled[src_rows[i]] where src_rows[i] >= 0: input tokens the
        device sampled in the step before, which the host has not seen yet (async output)."""
        ...


_OPS: dict[str, Callable[[], Ops]] = {}


def register_ops(name: str) -> Callable[[Callable[[], Ops]], Callable[[], Ops]]:
    def wrap(factory: Callable[[], Ops]) -> Callable[[], Ops]:
        assert name not in _OPS, f"ops {name!r} registered twice"
        _OPS[name] = factory
        return factory

    return wrap


def make_ops(name: str, device: torch.device) -> Ops:
    """`auto`: fused Triton kernels on CUDA, plain PyTorch elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        from kvflow.engines.native import triton_ops  # noqa: F401  (registers itself)
    if name == "invariant":
        from kvflow.engines.native import invariant  # noqa: F401  (registers itself)
    if name not in _OPS:
        raise ValueError(f"unknown ops {name!r}; known: auto, {', '.join(_OPS)}")
    return _OPS[name]()


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def torch_rope(
    positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    c = cos[positions].to(x.dtype)[:, None, :]
    s = sin[positions].to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@register_ops("torch")
class TorchOps:
    """Unfused PyTorch, the reference and the CPU path."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch_rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        summed = x + residual
        return torch_rms_norm(summed, weight, eps), summed

    def rope(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_rope(positions, q, cos, sin), torch_rope(positions, k, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    # Whether the model may keep FP8 weights for these ops to compute with (fp8.py): the
    # reference ops take them (dequantising per call), but only faster ops choose it.
    fp8_compute = False

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        """x @ weight.T (+ bias); an FP8 weight (fp8.py) is dequantised for the call."""
        scale = scale_of(weight)
        if scale is not None:
            weight = dequantize(weight, scale, x.dtype)
        return F.linear(x, weight, bias)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, weight)

    def norm_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
        eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
    ) -> Projected:
        if residual is None:
            return Projected(self.matmul(self.rms_norm(x, norm_weight, eps), weight, bias), x)
        h, summed = self.add_rms_norm(x, residual, norm_weight, eps)
        return Projected(self.matmul(h, weight, bias), summed)

    def silu_mul_linear(self, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.matmul(self.silu_mul(gate_up), weight)

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight).float()

    def chain_ids(self, ids: torch.Tensor, src_rows: torch.Tensor, sampled: torch.Tensor) -> None:
        ids.copy_(torch.where(src_rows >= 0, sampled[src_rows.clamp(min=0)], ids))
