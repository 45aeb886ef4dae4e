"""Batch-invariant ops and attention (`--batch-invariant`): a row's result never depends on its batch.

A library matmul or reduction may pick its algorithm (tile sizes, split-K, vector widths)
from the whole tensor's shape, so the same row can round differently when it shares a step
with other rows or when its prompt is chunked differently. Here every reduction runs on
tensors of one fixed shape, or through kernels that sum a row in the same order whatever
the rows around it:

- matmuls: on CUDA one Triton kernel whose K ranges are fixed by the weight's shape (its
  tile and launch follow the row count, which does not change a row's bits:
  triton_invariant.py); elsewhere rows in chunks of exactly `ROWS` (the last chunk
  zero-padded), so the library sees the same shape whatever the batch;
- norms: on CUDA the Triton kernel of one program per row; elsewhere chunks of `ROWS`;
- attention walks a sequence's keys in blocks of `KEYS` aligned at position 0 with an online
  softmax in float32, queries in chunks of `ROWS`; blocks past a query's position are masked
  to exact no-ops (scale 1, add 0), so how far a chunk reaches changes nothing for a row, and
  decode rows, prefill rows and chunked-prefill rows go through the same code. On CUDA the
  same holds for the Triton varlen kernel run with one fixed tiling for every step.

Decode steps replay CUDA graphs as in the default engine: a graph runs the kernels an eager
step runs, on the batch padded to the graph's size, and none of them sums a row differently
for the rows around it (each row's attention is its own query tile), so a sequence's decode
row gives the same bits in a graph, in an eager decode step and in a step mixed with
prefills.

Elementwise ops (rope, silu * up) are invariant as they are. Sampling is per row already;
random sampling is invariant for requests with their own seed (sampler.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

from kvflow.engines.native.attention import (
    AttentionMetadata,
    Rope,
    attend_per_sequence,
    register_backend,
)
from kvflow.engines.native.fp8 import dequantize, scale_of
from kvflow.engines.native.ops import Ops, Projected, TorchOps, register_ops, torch_rms_norm

ROWS = 64  # rows per matmul / norm chunk and queries per attention chunk
KEYS = 32  # keys per attention block


def by_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn applied to x's rows in zero-padded chunks of exactly ROWS rows; x is [T, ...]."""
    rows = x.shape[0]
    pad = (-rows) % ROWS
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    outs = [fn(chunk) for chunk in x.split(ROWS)]
    return torch.cat(outs)[:rows]


@lru_cache(maxsize=1)
def _fused() -> Ops:
    """The Triton ops whose kernels are batch-invariant as they are: one program per row (norm,
    rope) or per element block (silu * up), launched the same way for any number of rows."""
    from kvflow.engines.native.triton_ops import TritonOps

    return TritonOps()


def _matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from kvflow.engines.native.triton_invariant import invariant_matmul

    scale = scale_of(weight)
    if scale is not None:
        weight = dequantize(weight, scale, x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    out = invariant_matmul(flat if flat.stride(-1) == 1 else flat.contiguous(), weight)
    return out.view(*x.shape[:-1], weight.shape[0])


@register_ops("invariant")
class InvariantOps(TorchOps):
    """TorchOps with every reduction (matmul over K, norm over the hidden dim) fixed whatever the
    rows: on CUDA the Triton norm, rope and silu * up kernels and the invariant matmul
    (triton_invariant.py); elsewhere PyTorch on chunks of exactly ROWS rows."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.is_cuda:
            return _fused().rms_norm(x, weight, eps)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        return by_chunks(lambda c: torch_rms_norm(c, weight, eps), flat).reshape(shape)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:
            return _fused().add_rms_norm(x, residual, weight, eps)  # residual updated in place
        summed = x + residual
        return self.rms_norm(summed, weight, eps), summed

    def rope(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda:
            return _fused().rope(positions, q, k, cos, sin)
        return super().rope(positions, q, k, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return _fused().silu_mul(gate_up) if gate_up.is_cuda else super().silu_mul(gate_up)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return _matmul(x, weight)
        return by_chunks(lambda c: F.linear(c, weight), x)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        out = self.linear(x, weight)
        return out if bias is None else out + bias

    def norm_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
        eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
    ) -> Projected:
        if residual is None:
            h, summed = self.rms_norm(x, norm_weight, eps), x
        else:
            h, summed = self.add_rms_norm(x, residual, norm_weight, eps)
        return Projected(self.matmul(h, weight, bias), summed)

    def silu_mul_linear(self, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.linear(self.silu_mul(gate_up), weight)

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.linear(x, weight).float()


@register_backend("invariant")
class InvariantAttention:
    """Per sequence, fixed-shape blocks with an online softmax (see the module docstring)."""

    def warm_up(self, max_tokens: int, heads: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device) -> tuple[int, ...]:
        return ()  # its kernels warm by running steps

    def graphable(self, head_dim: int) -> bool:
        return not head_dim & (head_dim - 1)  # the Triton kernel; other widths loop on the host

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
        if rope is not None:
            q, k = rope(q, k)
        head_dim = q.shape[-1]
        if q.is_cuda and not head_dim & (head_dim - 1):
            return _triton_attention(q, k, v, kv_cache, meta, scale, window)
        return attend_per_sequence(q, k, v, kv_cache, meta, scale, window, sequence_attention)


def _triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, window: int | None,
) -> torch.Tensor:
    """GPU: the varlen prefill kernel for every step, decode too, with one fixed tiling. Each
    query row walks key tiles from position 0 in order; tiles past it are exact no-ops. A KV
    head's query heads share a tile where the group divides its rows (K/V read once per KV
    head); a row computes the same whichever rows share its tile."""
    from kvflow.engines.native.triton_attention import PrefillTiling, paged_prefill, store_kv

    store_kv(kv_cache, k, v, meta.slot_mapping)
    tiling = PrefillTiling(TILE_ROWS, KEYS * 2, 4, 2)
    group = q.shape[1] // kv_cache.shape[3]
    pack = packs(group, meta.query_start_host[-1], meta.num_seqs)
    return paged_prefill(q, kv_cache, meta, scale, window, tiling, mask_all=True, pack=pack)


TILE_ROWS = 16  # query rows per attention tile (GPU), every step
MAX_TILES = 65535  # a CUDA grid's second axis, where the tiles go


def packs(group: int, tokens: int, seqs: int) -> bool:
    """Whether a step's attention tiles pack each KV head's `group` query heads: where the
    group divides a tile's rows and the step's tiles (TILE_ROWS // group queries each, at most
    one part-filled per sequence) still fit the grid. Packed or not, a row's bits are the same."""
    if TILE_ROWS % group:
        return False
    return tokens // (TILE_ROWS // group) + seqs <= MAX_TILES


def sequence_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """Causal attention of one sequence's last q_len positions over its seq_len keys."""
    q_len, heads, _ = q.shape
    seq_len, kv_heads, _ = keys.shape
    group = heads // kv_heads
    key_pad = (-seq_len) % KEYS
    k = F.pad(keys.float(), (0, 0, 0, 0, 0, key_pad)).repeat_interleave(group, dim=1)
    v = F.pad(values.float(), (0, 0, 0, 0, 0, key_pad)).repeat_interleave(group, dim=1)
    k, v = k.transpose(0, 1), v.transpose(0, 1)  # [H, keys, D]
    first_pos = seq_len - q_len
    outs = []
    for c0 in range(0, q_len, ROWS):
        chunk = q[c0 : c0 + ROWS].float()
        rows = chunk.shape[0]
        chunk = F.pad(chunk, (0, 0, 0, 0, 0, ROWS - rows)).transpose(0, 1)  # [H, ROWS, D]
        q_pos = torch.arange(ROWS, device=q.device) + first_pos + c0
        outs.append(_chunk_attention(chunk, k, v, q_pos, scale, window)[:, :rows])
    return torch.cat(outs, dim=1).transpose(0, 1).to(q.dtype)


def _chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float,
    window: int | None,
) -> torch.Tensor:
    """q [H, ROWS, D] at positions q_pos over k, v [H, n*KEYS, D], key blocks in order from 0."""
    heads, rows, dim = q.shape
    acc = q.new_zeros(heads, rows, dim)
    total = q.new_zeros(heads, rows, 1)
    run_max = q.new_full((heads, rows, 1), -1e30)
    reach = min(int(q_pos[-1].item()) + 1, k.shape[1])
    for b0 in range(0, reach, KEYS):
        k_pos = torch.arange(b0, b0 + KEYS, device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - window
        scores = torch.bmm(q, k[:, b0 : b0 + KEYS].transpose(1, 2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        new_max = torch.maximum(run_max, scores.amax(dim=-1, keepdim=True))
        probs = torch.exp(scores - new_max)
        alpha = torch.exp(run_max - new_max)
        total = total * alpha + probs.sum(dim=-1, keepdim=True)
        acc = acc * alpha + torch.bmm(probs, v[:, b0 : b0 + KEYS])
        run_max = new_max
    return acc / total.clamp(min=1e-30)
