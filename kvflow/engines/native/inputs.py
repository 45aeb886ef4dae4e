"""Building one step's device tensors from the scheduler's output: ids, positions, slots, block tables.

All integer inputs travel in two packed copies (int64 and int32) and are sliced on the device,
each slice 16-byte aligned (one Triton specialisation for every batch).
Sequence `i` of the step computes tokens `start .. start + n` of its token list; they are
stored in the cache slots its block list names, and attend to the whole context
`0 .. start + n`. Rows that reach the end of a sequence (`samples`) get logits. With async
output the last input token may still be a placeholder (sequence.py): its row then names
the row of the step before whose sampled id it is (`chain_rows`, see Ops.chain_ids).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from kvflow.engines.core.scheduler import ScheduledSeq
from kvflow.engines.core.sequence import Sequence
from kvflow.engines.native.attention import AttentionMetadata


@dataclass
class StepInputs:
    """Everything the model and the sampler need for one step."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # int64 [S]: rows whose next token is sampled
    sampling_seqs: list[ScheduledSeq]  # the S sequences that sample, in row order
    chain_rows: torch.Tensor | None = None  # int64 [T]: last step's sampled row, or -1
    # Every scheduled sequence, in batch order (rows query_start_host[i]:[i + 1]).
    scheduled: list[ScheduledSeq] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_inputs(
    scheduled: list[ScheduledSeq], block_size: int, device: torch.device,
    last_rows: Mapping[Sequence, int] | None = None,
) -> StepInputs:
    """Flatten the scheduled sequences into one batch, in scheduling order; `last_rows`
    gives each sequence's sampling row in the step before (for placeholder tokens)."""
    ids: list[int] = []
    chained: list[tuple[int, int]] = []  # (row, row of the step before)
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    logits_rows: list[int] = []
    for s in scheduled:
        seq, lo, hi = s.seq, s.start, s.start + s.num_new_tokens
        ids += seq.token_ids[lo:hi]
        if hi > len(seq.token_ids):  # the last input is a placeholder
            assert hi == len(seq.token_ids) + 1 and last_rows is not None
            chained.append((len(ids), last_rows[seq]))
            ids.append(0)
        positions += range(lo, hi)
        slots += _slots(seq.block_ids, lo, hi, block_size)
        starts.append(starts[-1] + s.num_new_tokens)
        seq_lens.append(hi)
        if s.samples:
            logits_rows.append(starts[-1] - 1)
    tables = block_table_array([s.seq.block_ids for s in scheduled], pad=0, multiple=16)
    t, b = len(ids), len(scheduled)
    chain = _chain(chained, t)
    longs, (_, at_pos, at_slot, at_rows, at_chain) = _pack(
        [ids, positions, slots, logits_rows, chain], np.int64, device)
    ints, (_, at_lens, at_table) = _pack([starts, seq_lens, tables.ravel()], np.int32, device)
    meta = AttentionMetadata(
        slot_mapping=longs[at_slot : at_slot + t],
        query_start_loc=ints[: b + 1],
        seq_lens=ints[at_lens : at_lens + b],
        block_tables=ints[at_table : at_table + tables.size].view(b, tables.shape[1]),
        max_query_len=max(s.num_new_tokens for s in scheduled),
        max_seq_len=max(seq_lens),
        query_start_host=starts,
        seq_lens_host=seq_lens,
    )
    return StepInputs(
        input_ids=longs[:t],
        positions=longs[at_pos : at_pos + t],
        meta=meta,
        logits_indices=longs[at_rows : at_rows + len(logits_rows)],
        sampling_seqs=[s for s in scheduled if s.samples],
        chain_rows=longs[at_chain : at_chain + t] if chained else None,
        scheduled=scheduled,
    )


def _chain(chained: list[tuple[int, int]], num_tokens: int) -> list[int]:
    if not chained:
        return []
    rows = [-1] * num_tokens
    for row, last in chained:
        rows[row] = last
    return rows


def _slots(block_ids: list[int], lo: int, hi: int, block_size: int) -> list[int]:
    if hi - lo == 1:
        return [block_ids[lo // block_size] * block_size + lo % block_size]
    pos = np.arange(lo, hi)
    blocks = np.asarray(block_ids, dtype=np.int64)[pos // block_size]
    return (blocks * block_size + pos % block_size).tolist()


def block_table_array(block_lists: list[list[int]], pad: int, multiple: int = 1) -> np.ndarray:
    """Rows of block ids, right-padded with `pad` to the longest rounded up to a `multiple`
    (16: the row stride a kernel gets is always a multiple of 16, one Triton specialisation)."""
    width = -(-max(max((len(b) for b in block_lists), default=0), 1) // multiple) * multiple
    table = np.full((len(block_lists), width), pad, dtype=np.int32)
    for i, blocks in enumerate(block_lists):
        table[i, : len(blocks)] = blocks
    return table


def _pack(segments: list, dtype: type, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The segments in one array, copied to the device at once, each starting on a 16-byte
    boundary; returns the array and each segment's offset. Triton keys a kernel on whether
    each pointer argument is 16-byte aligned: with segments packed end to end, that changed
    with the batch's sizes, and a new combination compiled on the request path."""
    align = 16 // np.dtype(dtype).itemsize
    offsets = []
    total = 0
    for seg in segments:
        offsets.append(total)
        total += -(-len(seg) // align) * align
    packed = np.zeros(total, dtype=dtype)
    for at, seg in zip(offsets, segments, strict=True):
        packed[at : at + len(seg)] = seg
    return _to(packed, device), offsets


def _to(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """One host-to-device copy for a whole packed array."""
    return torch.from_numpy(values).to(device, non_blocking=True)
