"""Host-side attention metadata: the prefill kernel's tile order, which backends graphs can
capture (no GPU or Triton needed)."""

from __future__ import annotations

from kvflow.engines.native.attention import AttentionMetadata, prefill_tiles, single_prefill_meta


def _meta(q_lens: list[int], ctx_lens: list[int]) -> AttentionMetadata:
    import torch

    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens, strict=True)]
    empty = torch.empty(0, dtype=torch.int32)
    return AttentionMetadata(slot_mapping=empty, query_start_loc=empty, seq_lens=empty,
                             block_tables=empty, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
                             query_start_host=starts, seq_lens_host=seq_lens)


def test_prefill_tiles_launch_the_longest_first() -> None:
    """Tiles in order of the keys they attend (a cached prefix counts), every tile once."""
    seqs, starts = prefill_tiles(_meta([100, 9, 1], [20, 0, 60]), 32)
    # keys seen: seq 0 (100 new after 20 cached) 120, 116, 84, 52 for its tiles at 96, 64, 32,
    # 0; seq 1 (9 new) 9; seq 2 (1 new after 60 cached) 61
    assert list(zip(seqs, starts, strict=True)) == [(0, 96), (0, 64), (0, 32), (2, 0), (0, 0), (1, 0)]


def test_a_sliding_window_caps_a_tiles_keys() -> None:
    """With a 16-token window every full tile of seq 0 sees at most 16 + 32 keys: they tie,
    and ties keep prompt order; the lone token after 60 cached sees 48 too."""
    seqs, starts = prefill_tiles(_meta([100, 9, 1], [20, 0, 60]), 32, window=16)
    assert list(zip(seqs, starts, strict=True)) == [(0, 0), (0, 32), (0, 64), (0, 96), (2, 0), (1, 0)]


def test_single_prefill_meta_after_a_cached_prefix() -> None:
    """Five new tokens after twenty cached: their slots follow the prefix, the sequence spans
    both, and the block table covers all 25 tokens."""
    meta = single_prefill_meta(5, 16, "cpu", cached=20)
    assert meta.slot_mapping.tolist() == [20, 21, 22, 23, 24]
    assert meta.seq_lens.tolist() == [25] and meta.seq_lens_host == [25]
    assert meta.query_start_loc.tolist() == [0, 5] and meta.query_start_host == [0, 5]
    assert meta.block_tables.tolist() == [[0, 1]]
    assert (meta.max_query_len, meta.max_seq_len) == (5, 25)
    fresh = single_prefill_meta(5, 16, "cpu")
    assert fresh.slot_mapping.tolist() == [0, 1, 2, 3, 4] and fresh.seq_lens_host == [5]


def test_which_backends_decode_steps_can_be_graphed() -> None:
    """A CUDA graph cannot read the step's host lengths: the gather backend loops over them,
    and so does the batch-invariant backend for head widths its Triton kernel does not take
    (the runner then leaves decode steps eager)."""
    import torch

    from kvflow.engines.native.attention import make_backend

    cpu = torch.device("cpu")
    assert not make_backend("torch", cpu).graphable(128)
    invariant = make_backend("invariant", cpu)
    assert invariant.graphable(128) and invariant.graphable(64)
    assert not invariant.graphable(80) and not invariant.graphable(96)
