"""kvflow.testing.tokenizer: the test tokenizers are deterministic, fast and load everywhere."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import tokenizers

from kvflow.testing.tokenizer import (
    BOS,
    EOS,
    IM_END,
    build_tokenizer,
    make_model_dir,
    write_config,
    write_tokenizer,
)


@pytest.mark.parametrize("kind", ["byte_level", "bpe_byte_fallback"])
def test_training_is_deterministic_and_fast(kind: str) -> None:
    start = time.perf_counter()
    first = build_tokenizer(kind=kind).to_str()
    assert time.perf_counter() - start < 1.0
    assert build_tokenizer(kind=kind).to_str() == first


@pytest.mark.parametrize("kind", ["byte_level", "bpe_byte_fallback"])
def test_vocab_size_and_special_tokens(kind: str) -> None:
    tok = build_tokenizer(vocab_size=600, kind=kind)
    assert tok.get_vocab_size() == 600
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    assert added[BOS] and added[EOS] and added[IM_END]
    assert added["<think>"] is False and added["<tool_call>"] is False
    assert added["[TOOL_CALLS]"] is False and added["</tool_call>"] is False
    assert "<think>" not in {
        t.content for t in build_tokenizer(add_think_tokens=False).get_added_tokens_decoder().values()
    }


def test_byte_fallback_spells_rare_characters_as_bytes() -> None:
    tok = build_tokenizer(kind="bpe_byte_fallback")
    pieces = tok.encode("🤖 龘").tokens
    assert "<0xF0>" in pieces and "<0xE9>" in pieces
    assert tok.decode(tok.encode("🤖 龘 hello").ids) == "🤖 龘 hello"


def test_model_dir_files(tmp_path: Path) -> None:
    root = make_model_dir(tmp_path, max_position_embeddings=4096, kind="byte_level")
    names = {p.name for p in root.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "config.json", "generation_config.json"} <= names
    config = json.loads((root / "config.json").read_text())
    tok = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
    assert config["max_position_embeddings"] == 4096
    assert config["vocab_size"] == tok.get_vocab_size()
    assert config["eos_token_id"] == tok.token_to_id(EOS)
    gen = json.loads((root / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.token_to_id(EOS), tok.token_to_id(IM_END)]


def test_write_config_explicit_eos_and_extra(tmp_path: Path) -> None:
    write_config(tmp_path, eos_token_id=[7, 9], architecture="MistralForCausalLM", hidden_size=32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["eos_token_id"] == [7, 9] and config["hidden_size"] == 32


def test_written_files_are_byte_identical_across_runs(tmp_path: Path) -> None:
    a = write_tokenizer(tmp_path / "a")
    b = write_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (a, b)]
        assert digest[0] == digest[1]


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="byte_level"):
        build_tokenizer(kind="wordpiece")


@pytest.mark.parametrize("kind", ["byte_level", "bpe_byte_fallback"])
def test_loads_with_transformers(tmp_path: Path, kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    root = make_model_dir(tmp_path, kind=kind)
    hf = transformers.AutoTokenizer.from_pretrained(str(root))
    raw = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
    text = "Hello 你好世界 🤖 <think>x</think> def f(): return 1"
    assert hf.encode(text) == raw.encode(text, add_special_tokens=True).ids
    assert hf.eos_token == EOS and hf.bos_token == BOS
    prompt = hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
