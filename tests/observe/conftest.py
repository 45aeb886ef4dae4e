"""Fixtures for observability tests: a tiny model and a stack of real kvflow processes."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvflow.testing.procs import LocalStack, Proc
from kvflow.testing.tokenizer import make_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny")


class Stack(LocalStack):
    """Real kvflow processes sharing one private file-discovery directory."""

    def __init__(self, tmp_path: Path, **settings: object) -> None:
        super().__init__(tmp_path, "obs", **settings)

    def mocker(self, model_dir: Path, *args: str) -> Proc:
        return self.start("worker", "--engine", "mocker", "--model-path", str(model_dir),
                          "--model-name", "m", "--speedup-ratio", "0", *args, name="worker")

    wait_workers = staticmethod(lambda *a, **kw: wait_workers(*a, **kw))
    get_json = staticmethod(lambda *a, **kw: get_json(*a, **kw))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    yield s
    s.stop()


def get_json(url: str, headers: dict[str, str] | None = None) -> object:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


async def wait_workers(base: str, model: str, count: int, timeout: float = 60) -> None:
    """Until `model` has `count` live workers on the frontend at `base`."""
    for _ in range(int(timeout / 0.1)):
        try:
            health = await asyncio.to_thread(get_json, base + "/health")
        except OSError:  # 503 while no model is ready
            health = {}
        if health.get("models", {}).get(model, 0) == count:  # type: ignore[union-attr]
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"model {model} never had {count} live workers")
