"""Tiny random-weight models, built once per test session, and a greedy reference from transformers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# The Triton kernel tests (test_triton_*.py) run compiled on a GPU and in Triton's interpreter
# elsewhere; the switch is read when triton is first imported, which those modules do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvflow.testing.models import make_tiny_model  # noqa: E402

MODEL_SPECS: dict[str, dict] = {
    "llama": {"arch": "llama"},
    "qwen2": {"arch": "qwen2"},
    "qwen3": {"arch": "qwen3"},
    "llama_tied": {"arch": "llama", "tie_word_embeddings": True},
    "mistral": {"arch": "mistral", "sliding_window": 6},
    "llama_sharded": {"arch": "llama", "shards": 3},
    "llama_bf16": {"arch": "llama", "dtype": "bfloat16"},
    "llama_bf16_long": {"arch": "llama", "dtype": "bfloat16", "max_position_embeddings": 8192,
                        "hidden_size": 256, "num_heads": 4},  # 64-wide heads, 8k positions
    "llama3_rope": {
        "arch": "llama",
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_models(name)` -> the directory of that model, built on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            spec = dict(MODEL_SPECS[name])
            built[name] = make_tiny_model(tmp_path_factory.mktemp(name), **spec)
        return built[name]

    return get


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path], object]:
    """The transformers model for a directory, loaded once."""
    loaded: dict[Path, object] = {}

    def get(path: Path) -> object:
        if path not in loaded:
            loaded[path] = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        return loaded[path]

    return get


@pytest.fixture(scope="session")
def hf_greedy(hf_model: Callable[[Path], object]) -> Callable[[Path, list[int], int], list[int]]:
    """transformers' generate (do_sample=False) on a model dir: new tokens, EOS included."""

    def run(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
        model = hf_model(path)
        with torch.no_grad():
            out = model.generate(  # type: ignore[attr-defined]
                torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False
            )
        return out[0, len(prompt) :].tolist()

    return run
