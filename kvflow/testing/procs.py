"""Start and stop real kvflow processes from tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def runtime_env(discovery_path: str | Path | None = None, **settings: object) -> dict[str, str]:
    """An environment for a child process: KVFLOW_<NAME>=value for each setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVFLOW_")}
    if discovery_path is not None:
        env["KVFLOW_DISCOVERY_PATH"] = str(discovery_path)
    for key, value in settings.items():
        env["KVFLOW_" + key.upper()] = str(value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def live_workers(url: str, model: str, timeout: float = 5.0) -> int:
    """Workers the frontend at `url` counts for `model` now (its /health; 503 included)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    return int(json.loads(body)["models"].get(model, 0))


class Proc:
    """A child process with its output captured to a log file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        self.popen = subprocess.Popen(
            args, env=dict(env), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def stop(self) -> None:
        if self.alive():
            self.terminate(10)
        self._log.close()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if not self.alive():
                raise RuntimeError(f"process exited ({self.popen.returncode}):\n{self.output()[-4000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not seen in {timeout}s:\n{self.output()[-4000:]}")


def python_proc(
    script: str | Path,
    *args: str,
    env: Mapping[str, str],
    log_dir: Path,
    python: str | None = None,
    name: str = "proc",
) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(log_dir.glob(f"{name}-*.log")))
    return Proc([python or sys.executable, str(script), *args], env, log_dir / f"{name}-{n}.log")


def kvflow_proc(*args: str, env: Mapping[str, str], log_dir: Path, name: str = "kvflow") -> Proc:
    """`python -m kvflow.cli.main ARGS` as a child process."""
    log_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(log_dir.glob(f"{name}-*.log")))
    return Proc([sys.executable, "-m", "kvflow.cli.main", *args], env, log_dir / f"{name}-{n}.log")


class LocalStack:
    """Real kvflow processes sharing one private file-discovery directory (tests, benches)."""

    def __init__(self, tmp_path: Path, prefix: str = "stack", **settings: object) -> None:
        import uuid

        self.log_dir = tmp_path / "logs"
        self.env = runtime_env(discovery="file", discovery_path=tmp_path / "discovery",
                               namespace=prefix + uuid.uuid4().hex[:6], lease_ttl=1.0,
                               file_poll_interval=0.05, **settings)
        self.procs: list[Proc] = []

    def start(self, *args: str, name: str = "kvflow") -> Proc:
        proc = kvflow_proc(*args, env=self.env, log_dir=self.log_dir, name=name)
        self.procs.append(proc)
        return proc

    def frontend(self, *args: str) -> str:
        """Start `kvflow frontend` on a free port; its base URL once it listens."""
        import re

        proc = self.start("frontend", "--http-port", "0", *args, name="frontend")
        proc.wait_for_output("frontend: listening on", timeout=60)
        found = re.search(r"listening on (http://\S+)", proc.output())
        assert found is not None
        return found.group(1)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
