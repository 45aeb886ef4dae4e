"""FP8 copies of tiny test models, in the compressed-tensors or fbgemm_fp8 layout, and their references.

`make_fp8_checkpoint` quantises every decoder linear of a model directory to float8_e4m3fn with
per-tensor or per-channel scales (lm_head and embeddings stay as they are, as on the hub) and
can write the dequantised weights as a plain checkpoint: the exact model the FP8 one stands for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _quant_config(method: str, strategy: str) -> dict:
    if method == "fbgemm_fp8":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                "modules_to_not_convert": ["lm_head"]}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
               "dynamic": False}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
            "dynamic": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts}}}


def make_fp8_checkpoint(
    src: Path, dst: Path, method: str = "compressed-tensors", strategy: str = "tensor",
    reference: Path | None = None,
) -> Path:
    """Write `src` quantised to FP8 into `dst`; `reference` gets its dequantised float32 weights."""
    import torch
    from safetensors.torch import load_file, save_file

    if method == "fbgemm_fp8" and strategy != "channel":
        raise ValueError("fbgemm_fp8 checkpoints have per-channel scales")
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    quantised: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if not (name.endswith(".weight") and any(f".{n}." in name for n in _LINEARS)):
            quantised[name] = plain[name] = w
            continue
        wf = w.float()
        absmax = wf.abs().amax(dim=1, keepdim=True) if strategy == "channel" else wf.abs().amax()
        scale = (absmax / FP8_MAX).clamp(min=1e-12)
        q = (wf / scale).to(torch.float8_e4m3fn)
        quantised[name] = q
        quantised[name + "_scale"] = scale.reshape(-1, 1) if strategy == "channel" else scale.reshape(1)
        if method == "fbgemm_fp8":
            quantised[name.replace(".weight", ".input_scale_ub")] = torch.tensor([1200.0])
        plain[name] = (q.float() * scale).to(w.dtype)
    for out, data, quant in ((dst, quantised, True), (reference, plain, False)):
        if out is None:
            continue
        _copy_side_files(src, out)
        save_file(data, str(out / "model.safetensors"))
        if quant:
            config = json.loads((out / "config.json").read_text())
            config["quantization_config"] = _quant_config(method, strategy)
            (out / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def _copy_side_files(src: Path, dst: Path) -> None:
    """config.json, the tokenizer and the rest, but not the weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
