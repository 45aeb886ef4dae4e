"""Fixtures for end-to-end tests: a tiny model directory and process helpers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvflow.testing.procs import Proc, kvflow_proc, runtime_env
from kvflow.testing.tokenizer import make_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    yield s
    s.stop()


class Stack:
    """Real kvflow processes sharing one private file-discovery directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.log_dir = tmp_path / "logs"
        self.env = runtime_env(discovery="file", discovery_path=tmp_path / "discovery",
                               namespace="e2e" + uuid.uuid4().hex[:6], lease_ttl=1.0,
                               file_poll_interval=0.05)
        self.procs: list[Proc] = []

    def start(self, *args: str, name: str = "kvflow") -> Proc:
        proc = kvflow_proc(*args, env=self.env, log_dir=self.log_dir, name=name)
        self.procs.append(proc)
        return proc

    def frontend(self, *args: str) -> str:
        proc = self.start("frontend", "--http-port", "0", *args, name="frontend")
        proc.wait_for_output("frontend: listening on", timeout=60)
        return re.search(r"listening on (http://\S+)", proc.output()).group(1)  # type: ignore[union-attr]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
