"""Fixtures: a real test tokenizer/model dir, a running HttpFrontend and an OpenAI client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvflow.frontend.testing import EchoEngineClient, Served, start_served
from kvflow.llm.model_card import ModelCard, build_model_card
from kvflow.llm.tokenizer import Tokenizer
from kvflow.testing.tokenizer import make_model_dir

MODEL = "test-model"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def card(model_dir: Path) -> ModelCard:
    return build_model_card(str(model_dir), model_name=MODEL)


@pytest.fixture(scope="session")
def make_card(model_dir: Path):
    """Build a card for the test model dir with other options (name, parsers...)."""

    def make(name: str = MODEL, **kw: object) -> ModelCard:
        return build_model_card(str(model_dir), model_name=name, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    s = await start_served()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def echo(served: Served, card: ModelCard) -> EchoEngineClient:
    """The echo engine serving MODEL on the running frontend."""
    engine = EchoEngineClient()
    served.add(card, engine)
    return engine
