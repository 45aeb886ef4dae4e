"""CUDA graphs for decode steps: the model forward plus logits captured once per padded batch size.

A decode step of `B` sequences replays the graph of the smallest captured size >= B.
Inputs are copied into static buffers first; padding rows read and write only the
padding block, and their logits are dropped.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import torch

from kvflow.engines.native.attention import AttentionMetadata
from kvflow.engines.native.kv_cache import KvCacheLayout
from kvflow.engines.native.model import CausalLM


@dataclass
class _Static:
    """The buffers every captured graph reads from and writes to (sliced per size)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    logits: torch.Tensor | None = None


class DecodeGraphs:
    """Captured decode graphs by batch size; `run` returns logits for the real rows."""

    def __init__(
        self, model: CausalLM, layout: KvCacheLayout, max_blocks_per_seq: int,
        sizes: tuple[int, ...], device: torch.device,
    ) -> None:
        self.model, self.layout = model, layout
        self.sizes = sorted(sizes)
        top = self.sizes[-1]
        self.static = _Static(
            input_ids=torch.zeros(top, dtype=torch.int64, device=device),
            positions=torch.zeros(top, dtype=torch.int64, device=device),
            slot_mapping=torch.full((top,), layout.pad_slot, dtype=torch.int64, device=device),
            seq_lens=torch.ones(top, dtype=torch.int32, device=device),
            block_tables=torch.full((top, max_blocks_per_seq), layout.pad_block,
                                    dtype=torch.int32, device=device),
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def capture(self) -> None:
        """Capture largest first so smaller graphs reuse its memory pool."""
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: compile kernels, settle the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self._forward(size)
            self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def _meta(self, size: int) -> AttentionMetadata:
        s = self.static
        return AttentionMetadata(
            slot_mapping=s.slot_mapping[:size],
            query_start_loc=torch.empty(0),  # decode kernels do not read it
            seq_lens=s.seq_lens[:size],
            block_tables=s.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.layout.block_size * s.block_tables.shape[1],
            query_start_host=list(range(size + 1)),
            seq_lens_host=[1] * size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        s = self.static
        hidden = self.model(s.input_ids[:size], s.positions[:size], self._meta(size))
        return self.model.compute_logits(hidden)

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Replay the graph for this batch; returns logits [B, V] (a view, valid until next run)."""
        batch = input_ids.shape[0]
        size = self.sizes[bisect_left(self.sizes, batch)]
        s = self.static
        s.input_ids[:batch].copy_(input_ids)
        s.positions[:batch].copy_(positions)
        s.slot_mapping[:batch].copy_(meta.slot_mapping)
        s.seq_lens[:batch].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        s.block_tables[:batch, :width].copy_(meta.block_tables)
        self._reset_padding(batch, size)
        self.graphs[size].replay()
        return self.outputs[size][:batch]

    def _reset_padding(self, batch: int, size: int) -> None:
        s = self.static
        if size > batch:
            s.slot_mapping[batch:size].fill_(self.layout.pad_slot)
            s.seq_lens[batch:size].fill_(1)
            s.block_tables[batch:size].fill_(self.layout.pad_block)
