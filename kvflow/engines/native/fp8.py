"""FP8 (e4m3) checkpoints: reading the `compressed-tensors` and `fbgemm_fp8` layouts.

Both store a quantised linear `X` as `X.weight` (float8_e4m3fn, [out, in]) and
`X.weight_scale` (float32: one value, shape [] or [1], for per-tensor scales, or [out, 1] for
per-channel ones), with the real weight = weight * scale. Activation scales (`X.input_scale`,
fbgemm's `X.input_scale_ub`) only serve FP8 activation kernels and are dropped here. Layers the
config leaves out (`ignore`, `modules_to_not_convert`, e.g. lm_head) are plain tensors.

The loader dequantises each weight into the model dtype as it streams by (each of q/k/v keeps
its own scale before they are fused); the engine then serves it like any bf16 checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvflow.engines.native.config import UnsupportedModelError

FP8_DTYPES = (torch.float8_e4m3fn,)
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


def dequantized_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with FP8 weights replaced by weight * scale in `dtype`.

    A weight and its scale may come in either order (and from different shards); each is held
    until its partner arrives.
    """
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name.endswith(_DROPPED):
            continue
        if name.endswith(".weight_scale"):
            base = name[: -len("_scale")]
            if base in weights:
                yield base, dequantize(weights.pop(base), tensor, dtype)
            else:
                scales[base] = tensor
        elif name.endswith(".weight") and tensor.dtype in FP8_DTYPES:
            if name in scales:
                yield name, dequantize(tensor, scales.pop(name), dtype)
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
