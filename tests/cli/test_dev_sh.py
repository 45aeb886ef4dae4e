"""`scripts/dev.sh serve` skips the install when pyproject.toml is unchanged since the last one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from kvflow.testing.procs import Proc

ROOT = Path(__file__).resolve().parents[2]


def test_serve_skips_an_unchanged_install(tmp_path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    # The stamp the last install wrote (same recipe as dev.sh).
    subprocess.run(["bash", "-c", f'printf "%s" "$(cat pyproject.toml; echo bench)" | cksum '
                    f'> {venv}/.kvflow-install-bench'], cwd=ROOT, check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVFLOW_")}
    env.update(KVFLOW_VENV=str(venv), PYTHONPATH=str(ROOT), KVFLOW_DISCOVERY_PATH=str(tmp_path / "d"))
    proc = Proc(["bash", str(ROOT / "scripts" / "dev.sh"), "serve", "--http-port", "0"], env,
                tmp_path / "serve.log")
    try:
        proc.wait_for_output("ready at", timeout=90)
        assert "skipping install" in proc.output()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.popen.wait(20) == 0
    finally:
        proc.stop()
