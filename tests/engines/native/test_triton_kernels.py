"""The Triton attention kernels and fused ops against the PyTorch paths (GPU, or CPU via the interpreter)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")  # (conftest: the interpreter off GPU)

from kvflow.engines.native.attention import AttentionMetadata, make_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# On a GPU these are GPU tests (opt-in, `-m gpu`, with the rest); elsewhere they run in the
# interpreter wherever Triton is installed. Unmarked, `-m gpu` left them out on the GPU.
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []


def _random_batch(
    q_lens: list[int], ctx_lens: list[int], *, heads: int, kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens, strict=True)]
    blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, out-of-order blocks
    width = max(blocks_per_seq)
    tables, slots, used = [], [], 0
    for n, ctx, q in zip(blocks_per_seq, ctx_lens, q_lens, strict=True):
        row = perm[used : used + n]
        used += n
        tables.append(row + [0] * (width - n))
        slots += [row[t // block_size] * block_size + t % block_size for t in range(ctx, ctx + q)]
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    total = sum(q_lens)
    q = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_host=starts, seq_lens_host=seq_lens,
    )
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cache.to(DEVICE), meta


CASES = [
    # q_lens, ctx_lens, window
    ([1, 1, 1], [0, 37, 130], None),  # decode
    ([1, 1], [200, 5], 16),  # decode, sliding window
    ([19, 1, 70], [0, 44, 9], None),  # mixed prefill + decode + chunk with cached context
    ([33, 140], [70, 3], 24),  # prefill with sliding window
]


@pytest.mark.parametrize(("q_lens", "ctx_lens", "window"), CASES)
def test_triton_matches_gather_backend(
    q_lens: list[int], ctx_lens: list[int], window: int | None
) -> None:
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    q, k, v, cache, meta = _random_batch(
        q_lens, ctx_lens, heads=8, kv_heads=2, head_dim=32, block_size=16, dtype=dtype, seed=1
    )
    ref_cache = cache.clone()
    ref = make_backend("torch", DEVICE).forward(q, k, v, ref_cache, meta, 0.2, window)
    out = make_backend("triton", DEVICE).forward(q, k, v, cache, meta, 0.2, window)
    assert torch.equal(cache, ref_cache)  # both stored the new K/V in the same slots
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


@pytest.mark.parametrize(("q_lens", "ctx_lens", "window"), CASES)
def test_packed_heads_compute_each_row_alike(
    q_lens: list[int], ctx_lens: list[int], window: int | None
) -> None:
    """The batch-invariant tiling (every key tile masked): a program per KV head with its
    query heads packed in the tile's rows gives the bits of a program per query head."""
    from kvflow.engines.native.triton_attention import PrefillTiling, paged_prefill, store_kv

    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    q, k, v, cache, meta = _random_batch(
        q_lens, ctx_lens, heads=8, kv_heads=2, head_dim=32, block_size=16, dtype=dtype, seed=3
    )
    ref = make_backend("torch", DEVICE).forward(q, k, v, cache.clone(), meta, 0.2, window)
    store_kv(cache, k, v, meta.slot_mapping)
    tiling = PrefillTiling(16, 64, 4, 2)
    per_head = paged_prefill(q, cache, meta, 0.2, window, tiling, mask_all=True)
    packed = paged_prefill(q, cache, meta, 0.2, window, tiling, mask_all=True, pack=True)
    assert torch.equal(packed, per_head)
    err = (packed.float() - ref.float()).norm() / ref.float().norm()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


@pytest.mark.parametrize("head_dim", [256, 512])
def test_wide_heads_fit_the_prefill_tiles(head_dim: int) -> None:
    """Long and short prefill chunks and decode rows with heads wider than 128 (the long
    tile would need more shared memory than an SM has)."""
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    q, k, v, cache, meta = _random_batch(
        [100, 9, 1], [20, 0, 50], heads=4, kv_heads=2, head_dim=head_dim, block_size=16,
        dtype=dtype, seed=2)
    ref = make_backend("torch", DEVICE).forward(q, k, v, cache.clone(), meta, 0.05, None)
    out = make_backend("triton", DEVICE).forward(q, k, v, cache, meta, 0.05, None)
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
    # What the CPU interpreter cannot show (it has no shared-memory limit): a wider head's
    # tilings keep a tile's Q, K and V no larger than the 128-wide head's long tile, which
    # fits an SM (the short tile keeps 16 query rows, so it is compared with the long one, not
    # its own; the 256-row tiling of long chunks is for 128-wide heads only).
    from kvflow.engines.native.triton_attention import prefill_tiling

    base = prefill_tiling(128, 100)
    for query_len in (100, 9, 1024, 8192):
        wide = prefill_tiling(head_dim, query_len)
        tile = (wide.block_m + 2 * wide.block_n) * head_dim * wide.num_stages
        assert tile <= (base.block_m + 2 * base.block_n) * 128 * base.num_stages, (query_len, wide)


@pytest.mark.parametrize(("q_lens", "ctx_lens"), [([1100], [0]), ([1030, 40], [500, 0])])
def test_wide_tiling_for_long_chunks(q_lens: list[int], ctx_lens: list[int]) -> None:
    """Chunks of 1024 rows or more with 128-wide heads take the 256-row tiling."""
    from kvflow.engines.native.triton_attention import WIDE_TILING, prefill_tiling

    assert prefill_tiling(128, max(q_lens)) == WIDE_TILING
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    q, k, v, cache, meta = _random_batch(q_lens, ctx_lens, heads=8, kv_heads=2, head_dim=128,
                                         block_size=16, dtype=dtype, seed=4)
    ref = make_backend("torch", DEVICE).forward(q, k, v, cache.clone(), meta, 0.09, None)
    out = make_backend("triton", DEVICE).forward(q, k, v, cache, meta, 0.09, None)
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


@pytest.mark.skipif(DEVICE.type != "cuda" or torch.cuda.get_device_capability() != (9, 0),
                    reason="the cuDNN prefill path is enabled on sm_90 (where it was measured)")
@pytest.mark.parametrize(("q_lens", "ctx_lens", "window", "dense"), [
    ([4100], [0], None, True),  # one fresh long prompt: cuDNN, padded to 4608 rows
    ([4096], [0], None, True),  # a bucket's exact length: no padding
    ([4100], [16], None, False),  # a cached prefix: the paged kernel
    ([4096, 8], [0, 0], None, False),  # two sequences: the paged kernel
    ([4100], [0], 1024, False),  # a sliding window: the paged kernel
])
def test_dense_prefill_matches_gather_backend(q_lens: list[int], ctx_lens: list[int],
                                              window: int | None, dense: bool) -> None:
    """q, k and v as the model passes them: views of one fused qkv projection, RoPE to apply."""
    from kvflow.engines.native.attention import Rope
    from kvflow.engines.native.ops import make_ops
    from kvflow.engines.native.triton_attention import DENSE_BUCKET, DENSE_FROM

    q, k, v, cache, meta = _random_batch(q_lens, ctx_lens, heads=8, kv_heads=2, head_dim=128,
                                         block_size=16, dtype=torch.bfloat16, seed=5)
    fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    q, k, v = (t.view(-1, h, 128) for t, h in zip(fused.split([8 * 128, 2 * 128, 2 * 128], dim=1),
                                                    (8, 2, 2), strict=True))
    assert not q.is_contiguous()
    positions = torch.cat([torch.arange(c, c + n) for n, c in zip(q_lens, ctx_lens, strict=True)])
    angles = torch.arange(8192.0)[:, None] * 10000.0 ** (-torch.arange(64.0) / 64)
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    ref_cache = cache.clone()
    ref = make_backend("torch", DEVICE).forward(
        q.clone(), k.clone(), v, ref_cache, meta, 0.09, window,
        Rope(positions.to(DEVICE), cos, sin, make_ops("torch", DEVICE).rope))
    backend = make_backend("triton", DEVICE)
    out = backend.forward(q, k, v, cache, meta, 0.09, window,
                          Rope(positions.to(DEVICE), cos, sin, make_ops("triton", DEVICE).rope))
    # the dense path stores the new K/V all the same (RoPE through another op: within rounding)
    assert ((cache.float() - ref_cache.float()).norm() / ref_cache.float().norm()) < 1e-2
    assert backend.dense.available is (True if dense else None)  # type: ignore[attr-defined]
    assert out.shape == q.shape
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < 2e-2, err
    if dense:  # one plan per bucket up to the step budget
        warmed = backend.warm_up(5000, 8, 2, 128, torch.bfloat16, DEVICE)  # type: ignore[attr-defined]
        assert warmed == (DENSE_FROM, DENSE_FROM + DENSE_BUCKET, DENSE_FROM + 2 * DENSE_BUCKET)


@pytest.mark.parametrize("with_rope", [True, False])
def test_pack_dense_ropes_stores_and_pads(with_rope: bool) -> None:
    """The cuDNN path's one launch against RoPE (the Triton op, in place), the K/V store and
    copies: the same bits; zero rows after the prompt; the cache past it untouched."""
    from kvflow.engines.native.attention import Rope
    from kvflow.engines.native.ops import make_ops
    from kvflow.engines.native.triton_attention import pack_dense, store_kv

    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    q, k, v, cache, meta = _random_batch([37], [0], heads=8, kv_heads=2, head_dim=32,
                                         block_size=16, dtype=dtype, seed=8)
    fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    q, k, v = (t.view(37, -1, 32) for t in fused.split([8 * 32, 2 * 32, 2 * 32], dim=1))
    gen = torch.Generator().manual_seed(9)
    cos, sin = (torch.randn(64, 16, generator=gen).to(DEVICE) for _ in range(2))
    positions = torch.arange(37, device=DEVICE)
    rope = Rope(positions, cos, sin, make_ops("triton", DEVICE).rope) if with_rope else None
    ref_q, ref_k, ref_cache = q.clone(), k.clone(), cache.clone()
    if rope is not None:
        rope(ref_q, ref_k)
    store_kv(ref_cache, ref_k, v, meta.slot_mapping)
    qp, kp, vp = pack_dense(q, k, v, cache, meta.slot_mapping, rope, 48)
    for got, want in ((qp, ref_q), (kp, ref_k), (vp, v)):
        assert got.is_contiguous() and got.shape == (48, *want.shape[1:])
        assert torch.equal(got[:37], want) and not got[37:].any()
    assert torch.equal(cache, ref_cache)


def test_large_batches_of_wide_heads_take_the_narrow_decode_launch() -> None:
    """The rule (8 programs a multiprocessor, 128-wide heads), and the launch's output against
    the default launch's on the same step."""
    from kvflow.engines.native.triton_decode import (
        DEFAULT_LAUNCH,
        LARGE_BATCH_LAUNCH,
        SplitCounters,
        decode_launch,
        paged_decode,
    )

    assert decode_launch(256, 8, 128, 132) == LARGE_BATCH_LAUNCH
    assert decode_launch(64, 8, 128, 132) == DEFAULT_LAUNCH  # not measured: the default
    assert decode_launch(256, 8, 64, 132) == DEFAULT_LAUNCH  # 64-wide heads ran slower
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    q, k, v, cache, meta = _random_batch([1] * 3, [70, 5, 131], heads=4, kv_heads=2, head_dim=128,
                                         block_size=16, dtype=dtype, seed=11)
    counters = SplitCounters().get(6, q.device)
    outs = [paged_decode(q, k, v, cache.clone(), meta, 0.1, None, None, 1, counters, launch)
            for launch in (DEFAULT_LAUNCH, LARGE_BATCH_LAUNCH)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((outs[1].float() - outs[0].float()).norm() / outs[0].float().norm()) < tol


@pytest.mark.parametrize(("ctx_lens", "window"), [([0, 37, 130, 5], None), ([200, 5], 16)])
def test_fused_decode_applies_rope_and_stores_kv(ctx_lens: list[int], window: int | None) -> None:
    """Decode in one launch (rope on q and the new k, K/V store, splits merged by the last
    program) against rope, then the gather backend; the split counters end at zero."""
    from kvflow.engines.native.attention import Rope
    from kvflow.engines.native.ops import make_ops
    from kvflow.engines.native.triton_attention import TritonPagedBackend

    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    q, k, v, cache, meta = _random_batch(
        [1] * len(ctx_lens), ctx_lens, heads=8, kv_heads=2, head_dim=32, block_size=16,
        dtype=dtype, seed=5,
    )
    positions = torch.tensor(ctx_lens, device=DEVICE)
    gen = torch.Generator().manual_seed(6)
    cos, sin = (torch.randn(256, 16, generator=gen).to(DEVICE) for _ in range(2))
    ref_cache = cache.clone()
    ref_rope = Rope(positions, cos, sin, make_ops("torch", DEVICE).rope)
    ref = make_backend("torch", DEVICE).forward(q.clone(), k.clone(), v, ref_cache, meta, 0.2,
                                                window, ref_rope)
    backend = TritonPagedBackend()
    rope = Rope(positions, cos, sin, make_ops("triton", DEVICE).rope)
    q_before, k_before = q.clone(), k.clone()
    out = backend.forward(q, k, v, cache, meta, 0.2, window, rope)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)  # inputs left as they were
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((cache.float() - ref_cache.float()).norm() / ref_cache.float().norm()) < tol
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < tol
    assert all(int(b.count_nonzero()) == 0 for b in backend.counters.buffers)


def test_fused_ops_match_torch_ops() -> None:
    from kvflow.engines.native.ops import make_ops

    torch_ops, triton_ops = make_ops("torch", DEVICE), make_ops("triton", DEVICE)
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    gen = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(((a.float() - b.float()).norm() / b.float().norm()) < tol)

    x, res, w = rand(5, 96), rand(5, 96), rand(96)
    assert close(triton_ops.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6))
    ref_out, ref_res = torch_ops.add_rms_norm(x, res.clone(), w, 1e-6)
    out, new_res = triton_ops.add_rms_norm(x, res.clone(), w, 1e-6)
    assert close(out, ref_out) and close(new_res, ref_res)

    qkv = rand(7, (4 + 2 + 2) * 16)  # q, k, v as strided views of one fused projection
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(7, 4, 16), k.view(7, 2, 16)
    positions = torch.tensor([0, 3, 9, 1, 2, 40, 5], device=DEVICE)
    cos, sin = torch.randn(64, 8).to(DEVICE), torch.randn(64, 8).to(DEVICE)
    ref_q, ref_k = torch_ops.rope(positions, q, k, cos, sin)
    out_q, out_k = triton_ops.rope(positions, q, k, cos, sin)
    assert close(out_q, ref_q) and close(out_k, ref_k)
    assert out_q.data_ptr() == q.data_ptr()  # in place, inside the fused buffer

    gate_up = rand(3, 2 * 1500)
    assert close(triton_ops.silu_mul(gate_up), torch_ops.silu_mul(gate_up))

    ids = torch.arange(1500, device=DEVICE)  # over one program's block
    src = torch.full((1500,), -1, device=DEVICE)
    src[[0, 7, 1499]] = torch.tensor([2, 0, 1], device=DEVICE)
    sampled = torch.tensor([70, 71, 72], device=DEVICE)
    expected = torch.arange(1500, device=DEVICE)
    expected[[0, 7, 1499]] = torch.tensor([72, 70, 71], device=DEVICE)
    for ops in (torch_ops, triton_ops):
        chained = ids.clone()
        ops.chain_ids(chained, src, sampled)
        assert torch.equal(chained, expected)


async def test_engine_on_triton_kernels_matches_transformers(
    tiny_models: Callable[[str], Path], hf_greedy: Callable[[Path, list[int], int], list[int]]
) -> None:
    from kvflow.engines.native.config import NativeEngineConfig
    from kvflow.engines.native.engine import NativeEngine
    from kvflow.llm.protocol import PreprocessedRequest, SamplingOptions, StopConditions
    from kvflow.runtime.context import Context

    path = tiny_models("qwen3")  # q/k norms on strided views, then the fused rope
    config = NativeEngineConfig(
        model_path=str(path), device=DEVICE.type, dtype="float32", block_size=4,
        num_gpu_blocks=64, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=128,
        attention_backend="triton", ops="triton", enforce_eager=True,
    )
    engine = NativeEngine(config)
    await engine.start()
    try:
        prompts = [[5, 9, 200, 31, 7, 77, 300, 12, 8, 4, 100], [42, 43]]

        async def run(i: int, prompt: list[int]) -> list[int]:
            req = PreprocessedRequest(
                request_id=f"t{i}", token_ids=prompt, eos_token_ids=[1],
                sampling=SamplingOptions(temperature=0.0), stop=StopConditions(max_tokens=5),
            )
            return [t async for o in engine.generate(req, Context()) for t in o.token_ids]

        outs = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
        for prompt, out in zip(prompts, outs, strict=True):
            assert out == hf_greedy(path, prompt, 5)
    finally:
        await engine.stop()


def test_the_triton_backend_is_graphable_for_its_head_widths() -> None:
    backend = make_backend("triton", DEVICE)
    assert backend.graphable(128) and backend.graphable(64)
    assert not backend.graphable(80)  # it refuses such heads at the first step
