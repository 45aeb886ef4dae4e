"""CUDA graphs for decode steps: the model forward plus logits captured once per padded batch size.

A decode step of `B` sequences replays the graph of the smallest captured size >= B. Its
inputs are written straight from the scheduler's output into pinned host buffers laid out
like the graphs' static inputs, and reach the GPU in two asynchronous copies: no device
tensors are built per step and nothing is copied on the device. Padding rows read and
write only the padding block, and their logits are dropped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvflow.engines.core.scheduler import ScheduledSeq
from kvflow.engines.native.attention import AttentionMetadata
from kvflow.engines.native.kv_cache import KvCacheLayout
from kvflow.engines.native.model import CausalLM


@dataclass
class GraphStep:
    """A decode step staged into the graphs' inputs: replay graph `size`, keep `batch` rows."""

    size: int
    batch: int
    sampling_seqs: list[ScheduledSeq]  # every row samples, in row order


class _Inputs:
    """The static inputs every graph reads (sliced per size), on one device and pinned on the host.

    `longs` is int64 [3, top]: token ids, positions, cache slots. `ints` is int32: the
    sequence lengths [top], then the block table [top, max_blocks] row by row.
    """

    def __init__(self, top: int, max_blocks: int, layout: KvCacheLayout, device: torch.device):
        self.top, self.max_blocks, self.layout = top, max_blocks, layout
        longs = torch.zeros(3, top, dtype=torch.int64)
        longs[2] = layout.pad_slot
        ints = torch.full((top + top * max_blocks,), layout.pad_block, dtype=torch.int32)
        ints[:top] = 1
        self.host_longs, self.host_ints = longs.pin_memory(), ints.pin_memory()
        self.longs, self.ints = longs.to(device), ints.to(device)
        self.np_longs = self.host_longs.numpy()
        self.np_seq_lens = self.host_ints[:top].numpy()
        self.np_tables = self.host_ints[top:].view(top, max_blocks).numpy()
        self.copied = torch.cuda.Event()  # the last upload has read the host buffers

    def block_tables(self) -> torch.Tensor:
        return self.ints[self.top :].view(self.top, self.max_blocks)

    def write(self, scheduled: Sequence[ScheduledSeq], size: int) -> None:
        """Fill rows 0..size (padding after the real ones) on the host, then upload them."""
        self.copied.synchronize()
        bs = self.layout.block_size
        longs, seq_lens, tables = self.np_longs, self.np_seq_lens, self.np_tables
        for i, s in enumerate(scheduled):
            seq, pos = s.seq, s.start
            blocks = seq.block_ids
            longs[:, i] = (seq.token_ids[pos], pos, blocks[pos // bs] * bs + pos % bs)
            seq_lens[i] = pos + 1
            tables[i, : len(blocks)] = blocks
        batch = len(scheduled)
        longs[:2, batch:size] = 0
        longs[2, batch:size] = self.layout.pad_slot
        seq_lens[batch:size] = 1
        tables[batch:size, 0] = self.layout.pad_block
        used = self.top + size * self.max_blocks
        self.longs.copy_(self.host_longs, non_blocking=True)
        self.ints[:used].copy_(self.host_ints[:used], non_blocking=True)
        self.copied.record()


class DecodeGraphs:
    """Captured decode graphs by batch size: `stage` a step's inputs, then `replay` it for logits."""

    def __init__(
        self, model: CausalLM, layout: KvCacheLayout, max_blocks_per_seq: int,
        sizes: tuple[int, ...], device: torch.device,
    ) -> None:
        self.model, self.layout = model, layout
        self.sizes = sorted(sizes)
        self.inputs = _Inputs(self.sizes[-1], max_blocks_per_seq, layout, device)
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
        x = self.inputs
        return AttentionMetadata(
            slot_mapping=x.longs[2, :size],
            query_start_loc=torch.empty(0),  # decode kernels do not read it
            seq_lens=x.ints[:size],
            block_tables=x.block_tables()[:size],
            max_query_len=1,
            max_seq_len=self.layout.block_size * x.max_blocks,
            query_start_host=list(range(size + 1)),
            seq_lens_host=[1] * size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        longs = self.inputs.longs
        hidden = self.model(longs[0, :size], longs[1, :size], self._meta(size))
        return self.model.compute_logits(hidden)

    def accepts(self, scheduled: Sequence[ScheduledSeq]) -> bool:
        """A graph runs steps of one new token per sequence, each sampling, up to the largest size."""
        return 0 < len(scheduled) <= self.max_size and all(
            s.num_new_tokens == 1 and s.samples for s in scheduled
        )

    def stage(self, scheduled: Sequence[ScheduledSeq]) -> GraphStep:
        """Upload the step's inputs for the smallest graph that holds it (see `accepts`)."""
        batch = len(scheduled)
        size = self.sizes[bisect_left(self.sizes, batch)]
        self.inputs.write(scheduled, size)
        return GraphStep(size, batch, list(scheduled))

    def replay(self, step: GraphStep) -> torch.Tensor:
        """Logits [B, V] of the staged step (a view, valid until the next replay)."""
        self.graphs[step.size].replay()
        return self.outputs[step.size][: step.batch]

