"""Every command's --help reads well on its own: grouped flags, each with a sentence and a default."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ["run", "frontend", "worker", "router", "make-test-model"]


def _kvflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvflow.cli.main", *args], capture_output=True,
                          text=True, timeout=60)


def _parsers():
    from kvflow.cli.frontend import build_parser as frontend
    from kvflow.cli.run import build_parser as run
    from kvflow.engines.base import engine_names
    from kvflow.engines.worker import build_parser as worker

    yield "frontend", frontend()
    yield "run", run(for_help=True)
    for engine in engine_names():
        yield f"worker --engine {engine}", worker(engine)
        yield f"run out={engine}", run(engine, for_help=True)


def test_every_flag_has_a_sentence() -> None:
    missing = [f"{name}: {a.option_strings[0]}" for name, parser in _parsers() for a in parser._actions
               if a.option_strings and len((a.help or "").split()) < 2]
    assert missing == []


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_zero(command) -> None:
    out = _kvflow(command, "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"usage: kvflow {command}")


def test_run_help_documents_run() -> None:
    for out in (_kvflow("run", "--help"), _kvflow("run")):
        assert out.returncode == 0
        for text in ("in=http", "in=text", "in=batch:FILE", "out=ENGINE", "--model-path", "--http-port",
                     "worker:"):
            assert text in out.stdout, text
    assert "--speedup-ratio" in _kvflow("run", "out=mocker", "--help").stdout


def test_worker_help_says_how_to_see_engine_flags() -> None:
    out = _kvflow("worker", "--help").stdout
    assert "kvflow worker --engine NAME --help" in out and "echo, mocker, native" in out
    assert "--speedup-ratio" in _kvflow("worker", "--engine", "mocker", "--help").stdout


def test_top_level_help_and_version() -> None:
    out = _kvflow("--help")
    assert out.returncode == 0 and "--version" in out.stdout
    assert _kvflow("--version").stdout.startswith("kvflow ")
