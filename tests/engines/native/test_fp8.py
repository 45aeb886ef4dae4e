"""FP8 checkpoints (compressed-tensors, fbgemm_fp8): dequantised weights match their reference."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvflow.engines.native.attention import AttentionMetadata, make_backend
from kvflow.engines.native.config import ModelConfig, UnsupportedModelError
from kvflow.engines.native.fp8 import dequantized_tensors, quantize_rows_reference, scale_of
from kvflow.engines.native.kv_cache import KvCacheLayout, allocate_kv_cache
from kvflow.engines.native.weights import fp8_supported, load_model
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens
from kvflow.testing.fp8 import make_fp8_checkpoint

CPU = torch.device("cpu")
LAYOUTS = [("compressed-tensors", "tensor"), ("compressed-tensors", "channel"),
           ("fbgemm_fp8", "channel")]


def _logits(path: Path, prompt: list[int], fp8_compute: bool | None = None) -> torch.Tensor:
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, make_backend("torch", CPU), 256, CPU, torch.float32,
                       fp8_compute=fp8_compute)
    layout = KvCacheLayout(32, 4, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    model.set_kv_caches(allocate_kv_cache(layout, CPU))
    n = len(prompt)
    pos = torch.arange(n)
    meta = AttentionMetadata(
        slot_mapping=pos, query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(32, dtype=torch.int32)[None], max_query_len=n, max_seq_len=n,
        query_start_host=[0, n], seq_lens_host=[n],
    )
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(prompt), pos, meta))


@pytest.mark.parametrize(("method", "strategy"), LAYOUTS)
def test_fp8_checkpoint_matches_its_dequantised_reference(
    method: str, strategy: str, tiny_models: Callable[[str], Path], tmp_path: Path
) -> None:
    src = tiny_models("llama")
    fp8 = make_fp8_checkpoint(src, tmp_path / "fp8", method, strategy, reference=tmp_path / "ref")
    prompt = prompt_ids(23, seed=5)
    ours, ref, orig = _logits(fp8, prompt), _logits(tmp_path / "ref", prompt), _logits(src, prompt)
    # the same float32 numbers, computed the same way: equal to float32 rounding (1e-6)
    assert (ours - ref).norm() / ref.norm() < 1e-6
    # against the unquantised model: e4m3 keeps 3 mantissa bits; logits within 5% (relative)
    assert (ours - orig).norm() / orig.norm() < 5e-2


async def test_engine_serves_fp8_like_its_reference(
    tiny_models: Callable[[str], Path], tmp_path: Path
) -> None:
    fp8 = make_fp8_checkpoint(tiny_models("llama"), tmp_path / "fp8", "fbgemm_fp8", "channel",
                              reference=tmp_path / "ref")
    outs = []
    for path in (fp8, tmp_path / "ref"):
        engine = await small_native_engine(path)
        try:
            outs.append(tokens(await collect(engine, greedy_request("a", prompt_ids(19, 2), 8))))
        finally:
            await engine.stop()
    assert outs[0] == outs[1] and len(outs[0]) == 8


def test_unsupported_quantization_and_missing_scales_are_clear(
    tiny_models: Callable[[str], Path], tmp_path: Path
) -> None:
    fp8 = make_fp8_checkpoint(tiny_models("llama"), tmp_path / "fp8")
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="gptq"):
        _logits(fp8, [3, 4])
    weight = torch.zeros(4, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="lack a weight_scale"):
        list(dequantized_tensors([("layers.0.mlp.down_proj.weight", weight)], torch.float32))


@pytest.mark.parametrize(("method", "strategy"), LAYOUTS)
def test_fp8_weights_kept_with_row_scales_compute_the_reference(
    method: str, strategy: str, tiny_models: Callable[[str], Path], tmp_path: Path
) -> None:
    """FP8 compute's loading on CPU (the reference ops dequantise per call): the projections
    hold FP8 weights and one float32 scale per row, q/k/v each with their own, and the
    logits equal the dequantised reference's (to float32 rounding, 1e-6 relative)."""
    src = tiny_models("llama")
    fp8 = make_fp8_checkpoint(src, tmp_path / "fp8", method, strategy, reference=tmp_path / "ref")
    cfg = ModelConfig.from_dir(fp8)
    model = load_model(fp8, cfg, make_backend("torch", CPU), 256, CPU, torch.float32,
                       fp8_compute=True)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        assert linear.weight.dtype == torch.float8_e4m3fn
        assert scale_of(linear.weight) is linear.weight_scale
        assert linear.weight_scale.shape == (linear.weight.shape[0],)
    assert model.lm_head.weight.dtype == torch.float32  # left out of the quantisation
    scales = attn.qkv_proj.weight_scale
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if strategy == "tensor":  # q, k and v: three scales, each repeated over its rows
        parts = [scales[:q], scales[q : q + kv], scales[q + kv :]]
        assert all(bool((p == p[0]).all()) for p in parts)
        assert len({float(p[0]) for p in parts}) == 3
    prompt = prompt_ids(23, seed=5)
    ours = _logits(fp8, prompt, fp8_compute=True)
    ref = _logits(tmp_path / "ref", prompt)
    assert (ours - ref).norm() / ref.norm() < 1e-6
    assert not fp8_supported(CPU, model.ops)  # off CUDA the engine dequantises on load


def test_quantize_rows_reference_round_trips_within_e4m3_precision() -> None:
    """Dynamic per-row activation scales (what the Triton kernel computes on GPU): each row's
    peak maps to 448, and q * s is within e4m3's relative step (2^-3) of x."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0])[:, None]
    q, s = quantize_rows_reference(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    back = q.float() * s
    assert torch.allclose(back.abs().amax(dim=1)[:4], x.abs().amax(dim=1)[:4], rtol=1e-6)
    assert ((back - x).abs() <= x.abs() * 2**-3 + s * 2**-9).all()
    assert (back[4] == 0).all()  # an all-zero row stays zero (the scale is clamped, not 0)


def test_fp8_weights_are_known_by_shape_while_their_model_lives() -> None:
    """The GEMV launch tuning reads every FP8 weight of a shape (one per layer): the weights
    `make_fp8_projections` makes are listed by shape and device, and leave the list with
    their model."""
    import gc

    from kvflow.engines.native.fp8 import fp8_weights_like, make_fp8_projections

    layers = torch.nn.Sequential(torch.nn.Linear(48, 40, bias=False), torch.nn.Linear(48, 40, bias=False),
                                 torch.nn.Linear(40, 48, bias=False))
    make_fp8_projections(layers, ["0", "1", "2"])
    same = fp8_weights_like(layers[0].weight)
    assert {id(w) for w in same} == {id(layers[0].weight), id(layers[1].weight)}
    assert [id(w) for w in fp8_weights_like(layers[2].weight)] == [id(layers[2].weight)]
    probe = torch.empty(40, 48, dtype=layers[0].weight.dtype)
    del layers, same
    gc.collect()
    assert fp8_weights_like(probe) == []
