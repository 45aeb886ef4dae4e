"""A missing optional dependency is one line naming the extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _without(tmp_path: Path, *modules: str) -> str:
    """A PYTHONPATH on which `modules` cannot be imported, as if they were not installed."""
    block = tmp_path / "block"
    for name in modules:
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    return os.pathsep.join([str(block), *sys.path])


@pytest.mark.parametrize(("module", "args", "extra"), [
    ("aetcd", ["--engine", "echo", "--discovery", "etcd"], "etcd"),
    ("nats", ["--engine", "echo", "--event-plane", "nats"], "nats"),
    ("torch", ["--engine", "native"], "torch"),
])
def test_missing_extra_is_one_line(stack, model_dir, tmp_path, module, args, extra) -> None:
    env = {**stack.env, "PYTHONPATH": _without(tmp_path, module)}
    out = subprocess.run([sys.executable, "-m", "kvflow.cli.main", "worker", "--model-path", str(model_dir),
                          *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if " INFO " not in ln]
    assert errors == [errors[0]] and f"pip install 'kvflow[{extra}]'" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
