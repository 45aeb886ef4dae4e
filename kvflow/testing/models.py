"""Tiny random-weight Hugging Face models for tests: config.json, safetensors and a real tokenizer.

Built with transformers (a test-only dependency) so the native engine can be checked token for
token against transformers' own forward pass on the very same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvflow.testing.tokenizer import write_tokenizer

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    dtype: str = "float32",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    shards: int = 1,
    **config_extra: Any,
) -> Path:
    """Write a random-weight `arch` model and its tokenizer into `path`; return `path`.

    The model's vocabulary is the tokenizer's (asked for `vocab_size` tokens). `shards > 1`
    splits the weights over several files with a model.safetensors.index.json.
    `config_extra` goes to the transformers config (e.g. sliding_window, rope_scaling).
    """
    import torch
    import transformers

    if arch not in _CLASSES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(_CLASSES)}")
    out = Path(path)
    write_tokenizer(out, vocab_size=vocab_size)
    tok_vocab = _tokenizer_vocab_size(out)
    config_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[arch])
    config = config_cls(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size,
        vocab_size=tok_vocab,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=_eos_id(out),
        **config_extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(getattr(torch, dtype)).eval()
    _widen_weights(model, seed)
    size = _shard_size(model, shards)
    model.save_pretrained(out, max_shard_size=size)
    return out


def _widen_weights(model: Any, seed: int) -> None:
    """Redraw weights with a larger spread so greedy choices are decisive, not near-ties."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.dim() >= 2 or name.endswith("bias"):
                scale = 1.0 if "embed" in name else param.shape[-1] ** -0.5
                param.copy_(scale * torch.randn(param.shape, generator=gen))


def _shard_size(model: Any, shards: int) -> str:
    if shards <= 1:
        return "100GB"
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return f"{max(1, total // shards // 1000 + 1)}KB"


def _tokenizer_vocab_size(model_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size(
        with_added_tokens=True
    )


def _eos_id(model_dir: Path) -> int | None:
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.token_to_id(config["eos_token"])
