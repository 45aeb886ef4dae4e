"""The building blocks of a Llama-family decoder: RMSNorm, rotary embedding, GQA attention, SwiGLU.

Plain PyTorch modules holding the weights; the math goes through an `Ops` (ops.py). Projections
are fused (q/k/v into one matrix, gate/up into one) so a step launches fewer, larger matrix
products; the weight loader splits checkpoints accordingly. Each norm is applied by the
projection that reads its output (`Ops.norm_linear`), so an `Ops` may fuse the two.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvflow.engines.native.attention import AttentionBackend, AttentionMetadata, Rope
from kvflow.engines.native.config import ModelConfig, RopeConfig
from kvflow.engines.native.ops import Ops, Projected


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled in the input dtype."""

    def __init__(self, dim: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); may reuse `residual`'s storage."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)

    def project(self, x: torch.Tensor, residual: torch.Tensor | None, proj: nn.Linear) -> Projected:
        """proj(norm(x + residual)) and x + residual (at the first layer: proj(norm(x)) and x)."""
        return self.ops.norm_linear(x, residual, self.weight, self.eps, proj.weight, proj.bias)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies, with linear or llama3-style scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Float32 cos/sin tables of rotate-half RoPE, indexed by position (applied by `Ops.rope`)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.rope, self.head_dim, self.max_positions = rope, head_dim, max_positions
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.init_tables(self.cos.device)

    def init_tables(self, device: torch.device) -> None:
        """(Re)compute the float32 tables, e.g. after the model was built on the meta device."""
        if device.type == "meta":
            return
        inv_freq = rope_inv_freq(self.rope, self.head_dim).to(device)
        freqs = torch.outer(torch.arange(self.max_positions, device=device).float(), inv_freq)
        self.cos, self.sin = freqs.cos(), freqs.sin()



class Attention(nn.Module):
    """Grouped-query self-attention over the paged KV cache."""

    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, ops: Ops,
        window: int | None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.rotary, self.backend, self.ops, self.window = rotary, backend, ops, window
        self.scale = self.head_dim**-0.5
        self.kv_cache = torch.empty(0)  # set by the engine once the cache is allocated

    def forward(
        self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """qkv: the input already projected by `qkv_proj` (the layer fuses it with the norm).
        Every row's K/V is stored; with `keep` (row indices), only those rows are projected out."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = Rope(positions, self.rotary.cos, self.rotary.sin, self.ops.rope)
        out = self.backend.forward(q, k, v, self.kv_cache, meta, self.scale, self.window, rope)
        out = out.reshape(-1, self.q_size)
        if keep is not None:
            out = out[keep]
            if not out.shape[0]:  # no row kept (a prompt's middle chunk): nothing to project
                return out.new_empty(0, self.o_proj.weight.shape[0])
        return self.ops.linear(out, self.o_proj.weight)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); `forward` takes gate_up(x), projected with the norm."""

    def __init__(self, hidden: int, intermediate: int, ops: Ops) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.ops = ops

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_mul_linear(gate_up, self.down_proj.weight)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), with the adds fused into norms."""

    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, ops: Ops,
        layer: int,
    ) -> None:
        super().__init__()
        window = cfg.sliding_windows[layer] if cfg.sliding_windows else None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, rotary, backend, ops, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, ops)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
        meta: AttentionMetadata, keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x is the previous block's output (not yet added to `residual`, None at layer 0).
        With `keep` (row indices; the last layer), the outputs are those rows' alone: every
        row's K/V is still stored, but the output projection and the MLP skip the others."""
        qkv, residual = self.input_layernorm.project(x, residual, self.self_attn.qkv_proj)
        h = self.self_attn(positions, qkv, meta, keep)
        if keep is not None:
            residual = residual[keep]
            if not h.shape[0]:
                return h, residual
        gate_up, residual = self.post_attention_layernorm.project(h, residual,
                                                                   self.mlp.gate_up_proj)
        return self.mlp(gate_up), residual
