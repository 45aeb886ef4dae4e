"""A user's mistake is one or two lines on stderr, no traceback (unless --debug)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _kvflow(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvflow.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _error_lines(out: subprocess.CompletedProcess) -> list[str]:
    """stderr without log lines (those carry a timestamp and level)."""
    return [ln for ln in out.stderr.splitlines() if ln and " INFO " not in ln and " WARNING " not in ln]


@pytest.fixture
def no_tokenizer(tmp_path: Path) -> Path:
    d = tmp_path / "no-tokenizer"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


CASES = {
    "missing dir": (lambda tmp, nt: str(tmp / "nope"), "does not exist"),
    "no tokenizer.json": (lambda tmp, nt: str(nt), "has no tokenizer.json"),
    "hub id offline": (lambda tmp, nt: "some-org/not-a-model", "could not be fetched"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_worker_model_path_mistakes(stack, tmp_path, no_tokenizer, case) -> None:
    path_of, expect = CASES[case]
    env = {**stack.env, "HF_HUB_OFFLINE": "1"}
    out = _kvflow(env, "worker", "--engine", "echo", "--model-path", path_of(tmp_path, no_tokenizer))
    assert out.returncode == 2
    lines = _error_lines(out)
    assert 1 <= len(lines) <= 2, out.stderr
    assert lines[0].startswith("kvflow worker: error:") and expect in lines[0]
    assert "Traceback" not in out.stderr


def test_run_reports_the_workers_error(stack, tmp_path) -> None:
    out = _kvflow(stack.env, "run", "in=http", "out=echo", "--model-path", str(tmp_path / "nope"),
                  "--http-port", "0")
    assert out.returncode == 2
    lines = _error_lines(out)
    assert len(lines) == 2, out.stderr
    assert "does not exist" in lines[0] and "the worker exited" in lines[1]
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback(stack, tmp_path) -> None:
    out = _kvflow(stack.env, "--debug", "worker", "--engine", "echo", "--model-path", str(tmp_path / "x"))
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "does not exist" in out.stderr


def test_version(stack) -> None:
    out = _kvflow(stack.env, "--version")
    assert out.returncode == 0 and out.stdout.startswith("kvflow ")
