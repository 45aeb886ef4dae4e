"""The native model and loader against transformers on the same weights (CPU, gather backend)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kvflow.engines.native.attention import AttentionMetadata, make_backend
from kvflow.engines.native.config import ModelConfig, UnsupportedModelError
from kvflow.engines.native.kv_cache import KvCacheLayout, allocate_kv_cache
from kvflow.engines.native.layers import rope_inv_freq
from kvflow.engines.native.model import CausalLM
from kvflow.engines.native.weights import load_model, resolve_model_dir, safetensors_files

CPU = torch.device("cpu")
BLOCK = 4


def _load(path: Path, dtype: torch.dtype = torch.float32) -> CausalLM:
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, make_backend("torch", CPU), 256, CPU, dtype)
    layout = KvCacheLayout(32, BLOCK, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    model.set_kv_caches(allocate_kv_cache(layout, CPU))
    return model


def _chunk_meta(start: int, end: int, blocks: list[int]) -> AttentionMetadata:
    """Tokens start..end of one sequence whose blocks are `blocks` (context 0..end)."""
    pos = torch.arange(start, end)
    slots = torch.tensor(blocks)[pos // BLOCK] * BLOCK + pos % BLOCK
    n = end - start
    return AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([end], dtype=torch.int32),
        block_tables=torch.tensor([blocks], dtype=torch.int32),
        max_query_len=n, max_seq_len=end, query_start_host=[0, n], seq_lens_host=[end],
    )


def _logits(model: CausalLM, prompt: list[int], chunks: list[int]) -> torch.Tensor:
    """Run the prompt through the paged cache in chunks; logits of every position."""
    blocks = list(range(31, 31 - (len(prompt) + BLOCK - 1) // BLOCK, -1))  # scattered order
    out, start = [], 0
    for end in [*chunks, len(prompt)]:
        ids = torch.tensor(prompt[start:end])
        with torch.no_grad():
            hidden = model(ids, torch.arange(start, end), _chunk_meta(start, end, blocks))
            out.append(model.compute_logits(hidden))
        start = end
    return torch.cat(out)


def _reference(hf: object, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float()  # type: ignore[operator]


PROMPT = [int(x) for x in torch.randint(3, 500, (23,), generator=torch.Generator().manual_seed(7))]


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral", "llama3_rope", "llama_tied"])
def test_forward_matches_transformers(
    name: str, tiny_models: Callable[[str], Path], hf_model: Callable[[Path], object]
) -> None:
    path = tiny_models(name)
    ours = _logits(_load(path), PROMPT, chunks=[5, 13])  # three chunks over cached context
    ref = _reference(hf_model(path), PROMPT)
    assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral"])
def test_last_layer_keeps_only_the_sampling_rows(
    name: str, tiny_models: Callable[[str], Path], hf_model: Callable[[Path], object]
) -> None:
    """With `keep`, the forward returns those rows alone, with the full forward's values, and
    still stores every row's K/V: a chunk that keeps no row (a prompt's middle) leaves the
    cache the next chunk attends over complete."""
    path = tiny_models(name)
    model, ref = _load(path), _reference(hf_model(path), PROMPT)
    blocks = list(range(31, 31 - (len(PROMPT) + BLOCK - 1) // BLOCK, -1))
    for start, end, keep in ((0, 5, [1, 4]), (5, 13, []), (13, 23, [9])):
        ids = torch.tensor(PROMPT[start:end])
        rows = torch.tensor(keep, dtype=torch.int64)
        with torch.no_grad():
            hidden = model(ids, torch.arange(start, end), _chunk_meta(start, end, blocks), keep=rows)
            assert hidden.shape == (len(keep), model.cfg.hidden_size)
            if keep:
                ours, want = model.compute_logits(hidden), ref[[start + r for r in keep]]
                assert (ours - want).abs().max() < 1e-4 * want.abs().max()


def test_architecture_specifics_are_read(tiny_models: Callable[[str], Path]) -> None:
    assert ModelConfig.from_dir(tiny_models("qwen2")).attention_bias
    qwen3 = ModelConfig.from_dir(tiny_models("qwen3"))
    assert qwen3.qk_norm and not qwen3.attention_bias
    assert ModelConfig.from_dir(tiny_models("llama_tied")).tie_word_embeddings
    assert ModelConfig.from_dir(tiny_models("mistral")).sliding_windows == (6, 6)
    assert ModelConfig.from_dir(tiny_models("llama3_rope")).rope.kind == "llama3"


def test_llama3_rope_frequencies_match_transformers(tiny_models: Callable[[str], Path]) -> None:
    path = tiny_models("llama3_rope")
    hf_config = __import__("transformers").AutoConfig.from_pretrained(path)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, CPU)
    cfg = ModelConfig.from_dir(path)
    assert torch.allclose(rope_inv_freq(cfg.rope, cfg.head_dim), ref, rtol=1e-6)


def test_classic_rope_scaling_keys_are_read() -> None:
    raw = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }
    rope = ModelConfig.from_dict(raw).rope
    assert (rope.kind, rope.theta, rope.factor) == ("llama3", 500000.0, 32.0)


def test_sharded_checkpoint_loads_identically(
    tiny_models: Callable[[str], Path], hf_model: Callable[[Path], object]
) -> None:
    path = tiny_models("llama_sharded")
    assert len(safetensors_files(path)) > 1  # sharded, with an index file
    assert (path / "model.safetensors.index.json").exists()
    ours = _logits(_load(path), PROMPT, chunks=[])
    ref = _reference(hf_model(path), PROMPT)
    assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()


def test_bf16_checkpoint_loads_in_bf16(
    tiny_models: Callable[[str], Path], hf_model: Callable[[Path], object]
) -> None:
    path = tiny_models("llama_bf16")
    model = _load(path, torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    ours = _logits(model, PROMPT, chunks=[11])
    ref = _reference(hf_model(path), PROMPT)
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}
    ))
    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_dir(tmp_path)
    message = str(err.value)
    assert "GPTNeoXForCausalLM" in message
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in message


def test_missing_model_dir_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        safetensors_files(tmp_path)


def test_incomplete_checkpoint_is_reported(tiny_models: Callable[[str], Path]) -> None:
    from kvflow.engines.native.model import load_weights
    from kvflow.engines.native.weights import iter_tensors

    path = tiny_models("llama")
    cfg = ModelConfig.from_dir(path)
    model = CausalLM(cfg, make_backend("torch", CPU), 64)
    tensors = [(n, t) for n, t in iter_tensors(safetensors_files(path), CPU) if "k_proj" not in n]
    with pytest.raises(ValueError, match="lacks 2 tensors"):
        load_weights(model, tensors)
