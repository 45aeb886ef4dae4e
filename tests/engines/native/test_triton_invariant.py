"""The batch-invariant matmul: a row's bits never depend on the other rows (GPU, or CPU via the
interpreter), and its fixed tiling per weight shape."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")  # (conftest: the interpreter off GPU)

from kvflow.engines.native.triton_invariant import FEW, MANY, fit_stages, k_ranges, tiling
from kvflow.engines.native.triton_invariant import invariant_matmul as matmul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []
# Triton 3.9's interpreter multiplies bfloat16 dots wrongly (it reads their bits as integers);
# the kernel does not depend on the type, so the interpreter runs it in float16.
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16


def test_k_ranges_are_fixed_by_the_weight_shape() -> None:
    # 8B shapes on 132 SMs: 128-column tiles, K cut until one row covers 2 x 132 programs
    assert k_ranges(6144, 4096, 132) == (8, 512)  # 48 tiles -> 8 ranges of 8 chunks
    assert k_ranges(28672, 4096, 132) == (2, 2048)  # 224 tiles -> 2 ranges
    assert k_ranges(4096, 14336, 132) == (8, 1792)  # 32 tiles -> at most 8: 224 chunks / 8
    assert k_ranges(128256, 4096, 132) == (1, 4096)  # the LM head's tiles alone cover the GPU
    assert k_ranges(300, 200, 8) == (1, 256)  # 4 chunks: too few to cut
    assert k_ranges(300, 2000, 8) == (4, 512)  # 3 tiles; 32 chunks -> 4 ranges, the last 464 long
    # the tile follows the rows (it does not change the bits), the ranges do not
    assert tiling(1, 6144, 132) is FEW and tiling(8192, 6144, 132) is MANY


def test_stages_fit_the_shared_memory() -> None:
    assert fit_stages(MANY, None, 2) == MANY  # unknown: as it is
    assert fit_stages(MANY, 227 * 1024, 2) == MANY  # Hopper: 3 x 48 KiB staged
    assert fit_stages(MANY, 99 * 1024, 2).stages == 2  # 99 KiB (e.g. sm_89): 2 stages
    assert fit_stages(FEW, 99 * 1024, 2).stages == 4  # 4 x 24 KiB
    assert fit_stages(FEW, 64 * 1024, 2).stages == 2
    assert fit_stages(FEW, 1024, 2).stages == 1  # never fewer than one


@pytest.mark.parametrize(("n", "k"), [(300, 2000), (256, 512), (72, 200)])
def test_rows_are_batch_invariant(n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(150, k, generator=gen).to(DTYPE).to(DEVICE)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(DTYPE).to(DEVICE)
    full = matmul(x, w)
    ref = (x.float() @ w.float().T)
    assert torch.allclose(full.float(), ref, atol=2e-2, rtol=2e-2)
    # every launch (tile, ranges in one program or one each), any number of rows, a row
    # anywhere in its tile: the same bits
    for tile in (FEW, MANY):
        for inside in (False, True):
            assert torch.equal(matmul(x, w, tile=tile, in_program=inside), full), (tile, inside)
    for rows in (1, 3, 64, 65):
        assert torch.equal(matmul(x[:rows], w), full[:rows])
    assert torch.equal(matmul(x[70:71], w), full[70:71])
    perm = torch.randperm(150, generator=gen).to(DEVICE)
    assert torch.equal(matmul(x[perm], w), full[perm])
    # a strided view of the rows (e.g. an attention output) reads the same
    wide = torch.zeros(150, k + 8, dtype=x.dtype, device=DEVICE)
    wide[:, :k] = x
    assert torch.equal(matmul(wide[:, :k], w), full)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="8B shapes: too slow for the interpreter")
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336), (28672, 4096)])
def test_8b_shapes_decode_rows_match_prefill_rows(n: int, k: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(4096, k, device="cuda", generator=gen, dtype=DTYPE)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=DTYPE) * k**-0.5
    full = matmul(x, w)  # MANY, ranges added in each program
    assert tiling(4096, n, torch.cuda.get_device_properties(0).multi_processor_count) is MANY
    for rows in (1, 7, 64):  # FEW, a program per range
        assert torch.equal(matmul(x[:rows], w), full[:rows])


def test_invariant_ops_matmul_takes_views_bias_and_fp8_weights() -> None:
    """What InvariantOps runs on CUDA for a projection: any leading shape, a strided last dim
    (copied), a bias added after the sums, an FP8 weight dequantised first."""
    from kvflow.engines.native.fp8 import FP8
    from kvflow.engines.native.invariant import InvariantOps, _matmul

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 96, generator=gen).to(DTYPE).to(DEVICE)
    w = (torch.randn(40, 96, generator=gen) * 0.1).to(DTYPE).to(DEVICE)
    want = matmul(x.reshape(10, 96).contiguous(), w).view(2, 5, 40)
    assert torch.equal(_matmul(x, w), want)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # [2, 5, 96], last-dim stride 5
    assert torch.equal(_matmul(strided, w), want)
    if DEVICE.type == "cuda":  # InvariantOps dispatches to these kernels on CUDA only
        bias = torch.randn(40, generator=gen).to(DTYPE).to(DEVICE)
        assert torch.equal(InvariantOps().matmul(x, w, bias), want + bias)
    w8 = w.float().to(FP8)
    w8.fp8_scale = torch.full((40,), 0.5, device=DEVICE)  # type: ignore[attr-defined]
    expect = matmul(x.reshape(10, 96).contiguous(), (w8.float() * 0.5).to(DTYPE)).view(2, 5, 40)
    assert torch.equal(_matmul(x, w8), expect)
