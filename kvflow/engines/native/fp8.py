"""FP8 (e4m3) checkpoints: reading the `compressed-tensors` and `fbgemm_fp8` layouts.

Both store a quantised linear `X` as `X.weight` (float8_e4m3fn, [out, in]) and
`X.weight_scale` (float32: one value, shape [] or [1], for per-tensor scales, or [out, 1] for
per-channel ones), with the real weight = weight * scale. Activation scales (`X.input_scale`,
fbgemm's `X.input_scale_ub`) only serve FP8 activation kernels and are dropped here. Layers the
config leaves out (`ignore`, `modules_to_not_convert`, e.g. lm_head) are plain tensors.

Two ways to serve them (weights.load_model picks):

- *FP8 compute* (CUDA, compute capability 8.9 or later, the Triton ops, one rank): the decoder's
  projections keep their float8_e4m3fn weights, each with a float32 scale per output row
  (`fp8_scale` on the weight; a per-tensor scale is repeated over its rows, so q, k and v keep
  their own scales inside the fused qkv matrix). Matmuls of many rows quantise the activations
  per row and run on FP8 tensor cores (`torch._scaled_mm`, row-wise scales); single-row decode
  steps run a GEMV that reads the FP8 weights and scales them in registers (triton_gemv.py).
  Weights take half the memory and half the bytes per decode step.
- *Dequantise on load* (everywhere else): each weight becomes weight * scale in the model dtype
  as it streams by; the engine then serves it like any bf16 checkpoint.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvflow.engines.native.config import UnsupportedModelError

FP8 = torch.float8_e4m3fn
FP8_DTYPES = (FP8,)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# The fused projections whose weights FP8 compute keeps in FP8, and their checkpoint parts.
FP8_PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
_DROPPED = (".input_scale", ".input_scale_ub", ".output_scale")


@dataclass(frozen=True)
class Fp8Scheme:
    """How a checkpoint's FP8 weights are stored: the layout's name and its scale granularity."""

    method: str  # "compressed-tensors" or "fbgemm_fp8"
    strategy: str  # "tensor" or "channel"


def fp8_scheme(raw_config: dict[str, Any]) -> Fp8Scheme | None:
    """The FP8 scheme of a config.json, None for an unquantised model; raises for other schemes."""
    quant = raw_config.get("quantization_config") or raw_config.get("compression_config")
    if not quant:
        return None
    method = str(quant.get("quant_method", ""))
    if method == "fbgemm_fp8":
        return Fp8Scheme(method, "channel")
    if method == "compressed-tensors":
        return Fp8Scheme(method, _compressed_tensors_strategy(quant))
    raise UnsupportedModelError(
        f"quantization {method!r} is not supported by the native engine; it reads FP8 "
        "checkpoints in the compressed-tensors and fbgemm_fp8 layouts, or unquantised ones"
    )


def _compressed_tensors_strategy(quant: dict[str, Any]) -> str:
    strategies = set()
    for group in (quant.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8:
            raise UnsupportedModelError(
                "compressed-tensors: only 8-bit float (FP8 e4m3) weights are supported, got "
                f"{weights.get('num_bits')}-bit {weights.get('type')}"
            )
        strategies.add(str(weights.get("strategy", "tensor")))
    if not strategies or not strategies <= {"tensor", "channel"}:
        raise UnsupportedModelError(
            f"compressed-tensors: FP8 weight scales {sorted(strategies) or 'missing'} are not "
            "supported; per-tensor and per-channel are"
        )
    return "channel" if "channel" in strategies else "tensor"


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight (fp8 [out, in]) * scale ([] / [1] / [out, 1]), computed in float32."""
    scale = scale.float()
    if scale.numel() == 1:
        return (weight.float() * scale.reshape(())).to(dtype)
    if scale.numel() != weight.shape[0]:
        raise ValueError(
            f"FP8 weight scale of {scale.numel()} values for a weight of {weight.shape[0]} rows: "
            "only per-tensor and per-channel scales are supported"
        )
    return (weight.float() * scale.reshape(-1, 1)).to(dtype)


def row_scales(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A checkpoint scale ([] / [1] / [out, 1]) as float32 [out]: one value per weight row."""
    rows = weight.shape[0]
    if scale.numel() == 1:
        return scale.float().reshape(1).expand(rows).contiguous()
    if scale.numel() != rows:
        raise ValueError(
            f"FP8 weight scale of {scale.numel()} values for a weight of {rows} rows: "
            "only per-tensor and per-channel scales are supported"
        )
    return scale.float().reshape(rows).contiguous()


def dequantized_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
    keep: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with FP8 weights replaced by weight * scale in `dtype`, except
    those `keep(name)` chooses: they stay FP8, followed by `name + "_scale"`, float32 [rows].

    A weight and its scale may come in either order (and from different shards); each is held
    until its partner arrives.
    """
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}

    def pair(name: str, weight: torch.Tensor, scale: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if keep is not None and keep(name):
            yield name, weight
            yield name + "_scale", row_scales(weight, scale)
        else:
            yield name, dequantize(weight, scale, dtype)

    for name, tensor in tensors:
        if name.endswith(_DROPPED):
            continue
        if name.endswith(".weight_scale"):
            base = name[: -len("_scale")]
            if base in weights:
                yield from pair(base, weights.pop(base), tensor)
            else:
                scales[base] = tensor
        elif name.endswith(".weight") and tensor.dtype in FP8_DTYPES:
            if name in scales:
                yield from pair(name, tensor, scales.pop(name))
            else:
                weights[name] = tensor
        else:
            yield name, tensor
    if weights or scales:
        lonely = sorted(weights) or sorted(scales)
        raise ValueError(
            f"FP8 checkpoint: {len(weights)} weights lack a weight_scale and {len(scales)} "
            f"scales lack a weight, e.g. {lonely[:2]}; is the download complete?"
        )


def quantized_weight_names(names: Iterable[str]) -> set[str]:
    """The FP8 weights of a checkpoint, from its tensor names: those with a `weight_scale`."""
    return {n[: -len("_scale")] for n in names if n.endswith(".weight_scale")}


def fp8_projections(model: nn.Module, quantized: set[str]) -> list[str]:
    """Our projection modules (e.g. `layers.3.mlp.gate_up_proj`) whose every checkpoint part is
    FP8 in `quantized` (checkpoint weight names, with or without the `model.` prefix)."""
    names = {n.removeprefix("model.") for n in quantized}
    chosen = []
    for name, _ in model.named_modules():
        for ours, parts in FP8_PROJECTIONS.items():
            if name.endswith("." + ours):
                prefix = name[: -len(ours)]
                if all(f"{prefix}{p}.weight" in names for p in parts):
                    chosen.append(name)
    return chosen


def make_fp8_projections(model: nn.Module, modules: list[str]) -> None:
    """Give each named nn.Linear an empty FP8 weight and a float32 `weight_scale` [out] for the
    loader to fill; the weight carries its scale as `fp8_scale` (read by the ops)."""
    for name in modules:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear), name
        out_features, in_features = linear.weight.shape
        device = linear.weight.device
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                              requires_grad=False)
        scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                             requires_grad=False)
        linear.weight = weight
        linear.weight_scale = scale
        weight.fp8_scale = scale  # type: ignore[attr-defined]
        _BY_SHAPE.setdefault(tuple(weight.shape), weakref.WeakSet()).add(weight)


# FP8 weights by shape, for launch tuning that reads each layer's weight once, as a decode
# step does (triton_gemv.fp8_config); weak, so a model that goes away takes its weights along.
_BY_SHAPE: dict[tuple[int, ...], weakref.WeakSet[torch.Tensor]] = {}


def fp8_weights_like(weight: torch.Tensor) -> list[torch.Tensor]:
    """The FP8 weights made by `make_fp8_projections` with this weight's shape and device."""
    for shape in [s for s, ws in _BY_SHAPE.items() if not ws]:  # their models went away
        del _BY_SHAPE[shape]
    return [w for w in _BY_SHAPE.get(tuple(weight.shape), ()) if w.device == weight.device]


def scale_of(weight: torch.Tensor) -> torch.Tensor | None:
    """The per-row float32 scale of an FP8 weight kept for FP8 compute, else None."""
    if weight.dtype != FP8:
        return None
    scale = getattr(weight, "fp8_scale", None)
    assert scale is not None, "an FP8 weight without its scale"
    return scale


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / s in FP8, s [rows, 1] float32) with s = max|row| / 448: dynamic per-row scales, as
    the Triton kernel computes them (the reference for its test)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
