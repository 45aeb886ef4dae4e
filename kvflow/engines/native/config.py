"""Configs of the native engine: the engine's own knobs and the model shape read from config.json.

Both are frozen dataclasses and import no torch, so the CLI can build them without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvflow.kv.tiers.config import TierConfig
from kvflow.runtime.errors import UserError

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
DTYPES = ("auto", "bfloat16", "float16", "float32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32"}


class MissingModelFileError(UserError, FileNotFoundError):
    """The model directory lacks a file this engine needs (config.json)."""


class UnsupportedModelError(UserError, ValueError):
    """The model directory holds an architecture or option this engine does not implement."""


@dataclass(frozen=True)
class NativeEngineConfig:
    """Everything the native engine needs; defaults are the CLI defaults."""

    model_path: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_gpu_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gb: float = 1.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    attention_backend: str = "auto"  # "torch" (gather) or "triton" (GPU)
    ops: str = "auto"  # elementwise kernels: "torch" or "triton" (GPU, fused)
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    # Plan and launch each step before the last one's tokens reach the host (scheduler.py);
    # None: on where CUDA graphs run, where it hides the host's work behind the GPU's.
    async_output: bool | None = None
    # KV on CPU in /dev/shm, so same-host transfer peers copy blocks straight out of it.
    shared_kv: bool = False
    # Ranks (processes, one GPU each) the model's heads and MLP columns are split over.
    tensor_parallel_size: int = 1
    # The same prompt and sampling give the same tokens whatever else is in the batch and
    # however the prompt was chunked (invariant.py); decode steps still replay CUDA graphs
    # (the kernels an eager step runs; none sums a row differently for the graph's padding).
    batch_invariant: bool = False
    # Plain tokens a request's stream collects before its generator wakes (the first output
    # and the last are not held back): fewer, larger outputs, less event-loop work per step.
    stream_interval: int = 1
    # KV tiers below the device cache: host memory, disk, object store (kvflow.kv.tiers).
    tiers: TierConfig = field(default_factory=TierConfig)

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.tiers.enabled:
            raise ValueError("KV tiers do not work with --tensor-parallel-size > 1 yet (they would "
                             "keep rank 0's KV heads only); drop the tier flags or use size 1")
        if self.batch_invariant and self.tensor_parallel_size > 2:
            # two ranks' partial sums add once, in either order, to the same bits; across more
            # the all-reduce's order follows its message size, so the batch
            raise ValueError("--batch-invariant works with --tensor-parallel-size 1 or 2 (the "
                             "all-reduce over more ranks sums in an order the batch changes)")
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, got {self.stream_interval}")
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if normalize_dtype(self.dtype) not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def kernels(self) -> tuple[str, str]:
        """(attention backend, ops) to build: --batch-invariant overrides both."""
        if self.batch_invariant:
            return "invariant", "invariant"
        return self.attention_backend, self.ops


def normalize_dtype(name: str) -> str:
    return _DTYPE_ALIASES.get(name, name)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `kind` is "default", "linear" or "llama3"."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, read from a Hugging Face config.json."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    # Per-layer sliding window (None = full attention), one entry per layer.
    sliding_windows: tuple[int | None, ...] = ()
    torch_dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = field(default=())

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise MissingModelFileError(
                f"{path} not found: --model-path must be a Hugging Face model directory "
                "(config.json + *.safetensors) or a hub id"
            )
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        arch = _architecture(raw)
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        num_layers = int(raw["num_hidden_layers"])
        return cls(
            arch=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            sliding_windows=_sliding_windows(raw, arch, num_layers),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            eos_token_ids=_as_ids(raw.get("eos_token_id")),
        )


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = ", ".join(names) or f"model_type={raw.get('model_type')!r}"
    raise UnsupportedModelError(
        f"the native engine does not support architecture {found}; supported: "
        f"{', '.join(sorted(ARCHITECTURES))}. Use another engine (e.g. an adapter) for it."
    )


def _rope(raw: dict[str, Any]) -> RopeConfig:
    """Reads both the classic (rope_theta + rope_scaling) and the newer rope_parameters form."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    params.update(scaling)
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = str(params.get("rope_type") or params.get("type") or "default")
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(
            f"rope scaling type {kind!r} is not supported by the native engine; "
            "supported: default, linear, llama3"
        )
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def _sliding_windows(raw: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    enabled = raw.get("use_sliding_window", arch == "mistral")
    if not window or not enabled:
        return (None,) * num_layers
    layer_types = raw.get("layer_types")
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    first_sliding = int(raw.get("max_window_layers", 0)) if arch == "qwen2" else 0
    return tuple(int(window) if i >= first_sliding else None for i in range(num_layers))


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
