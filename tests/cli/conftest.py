"""Fixtures for end-to-end tests: a tiny model directory and process helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvflow.testing.procs import LocalStack
from kvflow.testing.tokenizer import make_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    yield s
    s.stop()


class Stack(LocalStack):
    """Real kvflow processes sharing one private file-discovery directory."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, "e2e")
