"""Finding a model (local dir or hub id), reading its safetensors, building the model on a device."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from kvflow.engines.native.attention import AttentionBackend
from kvflow.engines.native.config import ModelConfig, normalize_dtype
from kvflow.engines.native.fp8 import (
    dequantized_tensors,
    fp8_projections,
    fp8_scheme,
    make_fp8_projections,
    quantized_weight_names,
)
from kvflow.engines.native.model import CausalLM, load_weights, param_slice
from kvflow.engines.native.ops import Ops
from kvflow.llm.model_card import hub_reason
from kvflow.runtime.errors import UserError

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelFilesError(UserError, FileNotFoundError):
    """The model's directory or checkpoint files are missing: the user passes another path."""


def resolve_model_dir(model_path: str) -> Path:
    """A local directory as is; anything else is taken as a Hugging Face hub id and downloaded."""
    local = Path(model_path).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or model_path.startswith("."):
        raise ModelFilesError(f"model directory {model_path!r} does not exist; pass --model-path a "
                              "directory with config.json and *.safetensors (or a hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model_path, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise ModelFilesError(
            f"{model_path!r} is neither a local directory nor a downloadable hub id "
            f"({hub_reason(exc)});\n"
            "pass --model-path a directory with config.json and *.safetensors"
        ) from exc


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: from model.safetensors.index.json when sharded, else *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFilesError(
            f"no *.safetensors weights in {model_dir}; the native engine reads safetensors only "
            "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )
    return files


def iter_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    target = str(device) if device.type == "cuda" else "cpu"
    for path in files:
        with safe_open(str(path), framework="pt", device=target) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for CUDA, but torch sees no GPU; use --device cpu")
    return device


def resolve_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    """`auto` takes the checkpoint's dtype from config.json."""
    name = normalize_dtype(name)
    if name == "auto":
        name = normalize_dtype(cfg.torch_dtype)
    if name not in _TORCH_DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use bfloat16, float16 or float32")
    return _TORCH_DTYPES[name]


def empty_model(
    cfg: ModelConfig,
    backend: AttentionBackend,
    max_positions: int,
    device: torch.device,
    dtype: torch.dtype,
    ops: Ops | None = None,
) -> CausalLM:
    """The model with uninitialised weights on `device`, rotary tables filled in float32."""
    with torch.device("meta"):
        model = CausalLM(cfg, backend, max_positions, ops)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.init_tables(device)
    return model.eval().requires_grad_(False)


def load_model(
    model_dir: Path,
    cfg: ModelConfig,
    backend: AttentionBackend,
    max_positions: int,
    device: torch.device,
    dtype: torch.dtype,
    ops: Ops | None = None,
    fp8_compute: bool | None = None,
) -> CausalLM:
    """Build the model on `device` and fill it from the directory's safetensors (FP8 too).

    An FP8 checkpoint's projections keep their FP8 weights when `fp8_compute` (None: where
    `fp8_supported`), else every weight is dequantised into `dtype` as it streams in (fp8.py)."""
    scheme = fp8_scheme(json.loads((model_dir / "config.json").read_text()))
    model = empty_model(cfg, backend, max_positions, device, dtype, ops)
    files = safetensors_files(model_dir)
    tensors = iter_tensors(files, device)
    if scheme is not None:
        keep = fp8_supported(device, model.ops) if fp8_compute is None else fp8_compute
        modules = fp8_projections(model, quantized_weight_names(tensor_names(files))) if keep else []
        make_fp8_projections(model, modules)
        kept = {f"{m}.weight" for m in modules}

        def stays_fp8(name: str) -> bool:
            target = param_slice(name, cfg)
            return target is not None and target.param in kept

        tensors = dequantized_tensors(tensors, dtype, stays_fp8)
        log.info("native engine: FP8 checkpoint (%s, per-%s scales): %s", scheme.method,
                 scheme.strategy, f"FP8 compute in {len(modules)} projections" if modules
                 else f"dequantised to {str(dtype).removeprefix('torch.')} on load")
    load_weights(model, tensors)
    return model


def fp8_supported(device: torch.device, ops: Ops) -> bool:
    """FP8 compute where FP8 tensor cores are (CUDA, compute capability 8.9+: Ada, Hopper) and
    the ops have FP8 kernels (the Triton ops; not the batch-invariant or reference ones)."""
    if device.type != "cuda" or not ops.fp8_compute:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def tensor_names(files: list[Path]) -> list[str]:
    """Every tensor name in the checkpoint (headers only)."""
    from safetensors import safe_open

    names: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names += list(f.keys())
    return names
