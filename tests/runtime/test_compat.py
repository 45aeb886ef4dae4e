"""A worker on Python 3.10 streams to a client on Python 3.13 over the wire protocol."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvflow.testing.procs import python_proc

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent


def _interpreter(tag: str) -> str:
    python = ROOT / ".venv-compat" / tag / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} missing: run `bash scripts/dev.sh test` (it builds .venv-compat/{tag} "
                    f"when that Python is installed)")
    return str(python)


@pytest.mark.compat
def test_py310_worker_streams_to_py313_client(file_cluster) -> None:
    py310, py313 = _interpreter("py310"), _interpreter("py313")
    worker = python_proc(HERE / "worker_app.py", env=file_cluster.env(), log_dir=file_cluster.log_dir,
                         python=py310, name="worker310")
    file_cluster.procs.append(worker)
    worker.wait_for_output("READY", timeout=60)
    assert "py=(3, 10)" in worker.output()
    out = subprocess.run([py313, str(HERE / "compat_client.py")], env=file_cluster.env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK received=1000 py=(3, 13)" in out.stdout, out.stdout + out.stderr[-3000:]
