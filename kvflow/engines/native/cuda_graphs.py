"""CUDA graphs for decode steps: the model forward, logits and argmax captured once per padded batch size.

A decode step of `B` sequences replays the graph of the smallest captured size >= B. Its
inputs are written straight from the scheduler's output into a pinned host buffer laid
out like the graphs' static inputs, and reach the GPU in one asynchronous copy: no device
tensors are built per step and nothing is copied on the device. Padding rows read and
write only the padding block, and their logits are dropped.

Each graph starts by taking input tokens the host does not know yet from the last step's
sampled ids (async output, Ops.chain_ids) and ends by writing its rows' argmax there, so
a greedy step feeds the next without a trip through the host.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kvflow.engines.core.scheduler import ScheduledSeq
from kvflow.engines.core.sequence import Sequence as Seq
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
    """The static inputs every graph reads (sliced per size): one int64 buffer on the device,
    mirrored in pinned host memory.

    int64 rows [4, top]: token ids, positions, cache slots, and the row of the last step's
    sampled ids that replaces the token id (-1: none). Then, as int32, the sequence lengths
    [top] and the block table [top, max_blocks] row by row.
    """

    def __init__(self, top: int, max_blocks: int, layout: KvCacheLayout, device: torch.device):
        self.top, self.max_blocks, self.layout = top, max_blocks, layout
        n_ints = top + top * max_blocks
        cuda = device.type == "cuda"
        host = torch.zeros(4 * top + (n_ints + 1) // 2, dtype=torch.int64, pin_memory=cuda)
        self.host = host
        self.np_longs = host[: 4 * top].numpy().reshape(4, top)
        ints = host[4 * top :].numpy().view("int32")[:n_ints]
        self.np_seq_lens, self.np_tables = ints[:top], ints[top:].reshape(top, max_blocks)
        self.np_longs[2], self.np_longs[3] = layout.pad_slot, -1
        self.np_seq_lens[:], self.np_tables[:] = 1, layout.pad_block
        self.dev = host.to(device) if cuda else host.clone()
        self.longs = self.dev[: 4 * top].view(4, top)
        self.query_start = torch.arange(top + 1, dtype=torch.int32, device=device)  # never written
        self.ints = self.dev[4 * top :].view(torch.int32)[:n_ints]
        # The last upload has read the host buffer (CUDA; on the CPU the copy is synchronous).
        self.copied = torch.cuda.Event() if cuda else None
        # Block-table rows are written incrementally: row i holds `_lists[i]` (a sequence's
        # block list, kept by identity) whose first `_stable[i]` entries were committed when
        # written. Only commits change an entry in place, and only at or past
        # `num_committed_blocks`; every other change of a sequence's blocks is a new list.
        self._lists: list[list[int] | None] = [None] * top
        self._stable = [0] * top

    def block_tables(self) -> torch.Tensor:
        return self.ints[self.top :].view(self.top, self.max_blocks)

    def write(self, scheduled: Sequence[ScheduledSeq], size: int, last_rows: Mapping[Seq, int]) -> None:
        """Fill rows 0..size (padding after the real ones) on the host, then upload them."""
        if self.copied is not None:
            self.copied.synchronize()
        bs = self.layout.block_size
        longs, tables = self.np_longs, self.np_tables
        lists, stable = self._lists, self._stable
        rows: list[tuple[int, int, int, int]] = []
        for i, s in enumerate(scheduled):
            seq, pos = s.seq, s.start
            blocks = seq.block_ids
            slot = blocks[pos // bs] * bs + pos % bs
            if pos < len(seq.token_ids):
                rows.append((seq.token_ids[pos], pos, slot, -1))
            else:  # a placeholder: the device has the token
                rows.append((0, pos, slot, last_rows[seq]))
            n = len(blocks)
            if lists[i] is not blocks:
                tables[i, :n] = blocks
                lists[i] = blocks
            elif n - stable[i] == 1:
                tables[i, n - 1] = blocks[n - 1]
            elif n > stable[i]:
                tables[i, stable[i] : n] = blocks[stable[i] :]
            stable[i] = seq.num_committed_blocks
        batch = len(scheduled)
        lists[batch:size] = [None] * (size - batch)  # padding rows get the padding block
        longs[:, :batch] = list(zip(*rows, strict=True))
        longs[:2, batch:size] = 0
        longs[2, batch:size] = self.layout.pad_slot
        longs[3, batch:size] = -1
        self.np_seq_lens[:batch] = longs[1, :batch] + 1
        self.np_seq_lens[batch:size] = 1
        tables[batch:size, 0] = self.layout.pad_block
        used = 4 * self.top + (self.top + size * self.max_blocks + 1) // 2
        self.dev[:used].copy_(self.host[:used], non_blocking=True)
        if self.copied is not None:
            self.copied.record()


class DecodeGraphs:
    """Captured decode graphs by batch size: `stage` a step's inputs, then `replay` it for logits."""

    def __init__(
        self, model: CausalLM, layout: KvCacheLayout, max_blocks_per_seq: int,
        sizes: tuple[int, ...], device: torch.device, sampled: torch.Tensor,
    ) -> None:
        self.model, self.layout, self.device = model, layout, device
        self.sampled = sampled  # int64 [>= top]: the last step's sampled ids, read and written
        self.sizes = sorted(sizes)
        self.inputs = _Inputs(self.sizes[-1], max_blocks_per_seq, layout, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def capture(self) -> None:
        """Capture largest first so smaller graphs reuse its memory pool. Off CUDA nothing is
        captured: `replay` runs the same forward eagerly (a stand-in for host-side tests)."""
        if self.device.type != "cuda":
            return
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
        # A captured graph cannot read host lists; the eager stand-in (off CUDA) reads the
        # staged lengths, for backends that loop over sequences on the host.
        lens = [1] * size if self.device.type == "cuda" else x.np_seq_lens[:size].tolist()
        return AttentionMetadata(
            slot_mapping=x.longs[2, :size],
            query_start_loc=x.query_start[: size + 1],  # read by the batch-invariant backend
            seq_lens=x.ints[:size],
            block_tables=x.block_tables()[:size],
            max_query_len=1,
            max_seq_len=self.layout.block_size * x.max_blocks,
            query_start_host=list(range(size + 1)),
            seq_lens_host=lens,
        )

    def _forward(self, size: int) -> torch.Tensor:
        longs = self.inputs.longs
        self.model.ops.chain_ids(longs[0, :size], longs[3, :size], self.sampled)
        hidden = self.model(longs[0, :size], longs[1, :size], self._meta(size))
        logits = self.model.compute_logits(hidden)
        torch.argmax(logits, dim=-1, out=self.sampled[:size])
        return logits

    def accepts(self, scheduled: Sequence[ScheduledSeq]) -> bool:
        """A graph runs steps of one new token per sequence, each sampling, up to the largest size."""
        return 0 < len(scheduled) <= self.max_size and all(
            s.num_new_tokens == 1 and s.samples for s in scheduled
        )

    def stage(self, scheduled: Sequence[ScheduledSeq], last_rows: Mapping[Seq, int]) -> GraphStep:
        """Upload the step's inputs for the smallest graph that holds it (see `accepts`);
        `last_rows`: each sequence's sampling row in the step before."""
        batch = len(scheduled)
        size = self.sizes[bisect_left(self.sizes, batch)]
        self.inputs.write(scheduled, size, last_rows)
        return GraphStep(size, batch, list(scheduled))

    def replay(self, step: GraphStep) -> torch.Tensor:
        """Logits [B, V] of the staged step (a view, valid until the next replay); the rows'
        argmax is in `sampled[:B]`."""
        graph = self.graphs.get(step.size)
        if graph is None:
            return self._forward(step.size)[: step.batch]
        graph.replay()
        return self.outputs[step.size][: step.batch]

