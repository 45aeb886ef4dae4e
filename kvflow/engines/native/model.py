"""The causal language model (Llama, Mistral, Qwen2, Qwen3) and how checkpoint tensors map onto it.

`CausalLM.forward` takes one step's flattened tokens and returns hidden states; the engine
picks the rows that need logits and calls `compute_logits` on those alone. Given those rows
(`keep`), the last layer computes its output projection and MLP for them alone (its K/V
is stored for every row): a prompt's other rows are never read past that layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from kvflow.engines.native.attention import AttentionBackend, AttentionMetadata
from kvflow.engines.native.config import ModelConfig
from kvflow.engines.native.layers import DecoderLayer, RMSNorm, RotaryEmbedding
from kvflow.engines.native.ops import Ops, TorchOps


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(
        self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int,
        ops: Ops | None = None,
    ) -> None:
        super().__init__()
        ops = ops or TorchOps()
        self.cfg, self.ops = cfg, ops
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.rotary, backend, ops, i) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden]; with `keep` (row indices), [len(keep), hidden] of
        those rows alone."""
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, meta, keep if i == last else None)
        assert residual is not None
        if not x.shape[0]:  # no row kept: nothing to normalise
            return x
        return self.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.logits(hidden, self.lm_head.weight)

    def set_kv_caches(self, caches: list[torch.Tensor]) -> None:
        assert len(caches) == len(self.layers)
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.self_attn.kv_cache = cache


@dataclass(frozen=True)
class ParamSlice:
    """Where one checkpoint tensor goes: a parameter name and, for fused ones, a row range."""

    param: str
    start: int | None = None
    stop: int | None = None


def param_slice(name: str, cfg: ModelConfig) -> ParamSlice | None:
    """Map a Hugging Face tensor name to our parameter; None for tensors we skip."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if "rotary_emb" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
        return None
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    fused = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
        "self_attn.k_proj": ("self_attn.qkv_proj", q, q + kv),
        "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, q + 2 * kv),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
        "mlp.up_proj": ("mlp.gate_up_proj", inter, 2 * inter),
    }
    for hf, (ours, start, stop) in fused.items():
        if f".{hf}." in name:
            return ParamSlice(name.replace(hf, ours), start, stop)
    return ParamSlice(name)


def load_weights(model: CausalLM, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model; raise if any parameter was left unset."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in tensors:
            target = param_slice(name, model.cfg)
            if target is None:
                continue
            if target.param not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the {model.cfg.arch} model")
            dest = params[target.param].data[target.start : target.stop]
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}: config.json does not match the weights"
                )
            dest.copy_(tensor)
            loaded.add(f"{target.param}[{target.start}:{target.stop}]")
    _check_complete(model, loaded)


def _check_complete(model: CausalLM, loaded: set[str]) -> None:
    expected = {f"{s.param}[{s.start}:{s.stop}]" for s in _all_slices(model)}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}; "
            "is the download complete?"
        )


def _all_slices(model: CausalLM) -> list[ParamSlice]:
    """Every (parameter, rows) piece a complete checkpoint fills."""
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    out: list[ParamSlice] = []
    for name, _ in model.named_parameters():
        fused = next((f for f in parts if f".{f}." in name), None)
        hf_names = [name.replace(fused, p) for p in parts[fused]] if fused else [name]
        for hf_name in hf_names:
            target = param_slice(hf_name, model.cfg)
            assert target is not None, hf_name
            out.append(target)
    return out
