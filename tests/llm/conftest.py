"""Shared fixtures for the llm tests: real tiny tokenizers and model dirs built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvflow.llm.tokenizer import Tokenizer
from kvflow.testing.tokenizer import make_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE model dir with the default ChatML template."""
    return make_model_dir(tmp_path_factory.mktemp("byte_level"))


@pytest.fixture(scope="session")
def fallback_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentencepiece-style BPE model dir with <0xNN> byte-fallback tokens."""
    return make_model_dir(tmp_path_factory.mktemp("fallback"), kind="bpe_byte_fallback")


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def fallback_tokenizer(fallback_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(fallback_dir)


@pytest.fixture(scope="session", params=["byte_level", "bpe_byte_fallback"])
def any_tokenizer(
    request: pytest.FixtureRequest, tokenizer: Tokenizer, fallback_tokenizer: Tokenizer
) -> Tokenizer:
    return tokenizer if request.param == "byte_level" else fallback_tokenizer
