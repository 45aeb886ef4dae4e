"""Chaos fixtures: a real frontend and mocker workers, with handles to kill, stop and watch them."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from kvflow.testing.procs import Proc, kvflow_proc, live_workers, runtime_env
from kvflow.testing.servers import free_port
from kvflow.testing.tokenizer import make_model_dir

MODEL = "m"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("chaos-model") / "tiny")


class Worker:
    """A mocker worker process and its status port (GET /metrics shows its engine load)."""

    def __init__(self, proc: Proc, status_port: int) -> None:
        self.proc = proc
        self.status_port = status_port

    def _get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.status_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            return exc.read()

    def metric(self, name: str, family: str = "kvflow_worker_") -> float:
        """The sum of a metric (`kvflow_worker_<name>` by default) over all its labels."""
        text = self._get("/metrics").decode()
        pattern = rf"^{family}{name}\{{[^}}]*\}} (\S+)$"
        return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))

    def generate_requests(self) -> float:
        """Requests this worker's generate endpoint received (request-plane counter)."""
        text = self._get("/metrics").decode()
        pattern = r'^kvflow_endpoint_requests_total\{endpoint="[^"]*\.generate"\} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))

    def registered(self) -> bool:
        """Whether the worker has put its instances in discovery (its /health counts them)."""
        try:
            return json.loads(self._get("/health")).get("instances", 0) > 0
        except (OSError, ValueError):
            return False


class ChaosStack:
    """Real kvflow processes on a private file-discovery directory (or the given settings)."""

    def __init__(self, tmp_path: Path, model_dir: Path, **settings: object) -> None:
        self.log_dir = tmp_path / "logs"
        self.model_dir = model_dir
        base: dict[str, object] = {
            "discovery": "file", "discovery_path": tmp_path / "discovery",
            "namespace": "chaos" + uuid.uuid4().hex[:6], "lease_ttl": 1.0,
            "file_poll_interval": 0.05,
        }
        self.env = runtime_env(**{**base, **settings})
        self.procs: list[Proc] = []
        self.url = ""

    def start(self, *args: str, name: str, **env: object) -> Proc:
        full_env = {**self.env, **{f"KVFLOW_{k.upper()}": str(v) for k, v in env.items()}}
        proc = kvflow_proc(*args, env=full_env, log_dir=self.log_dir, name=name)
        self.procs.append(proc)
        return proc

    def frontend(self, *args: str) -> str:
        proc = self.start("frontend", "--http-port", "0", *args, name="frontend")
        proc.wait_for_output("frontend: listening on", timeout=60)
        found = re.search(r"listening on (http://\S+)", proc.output())
        assert found is not None
        self.url = found.group(1)
        return self.url

    def worker(self, *args: str, speedup: float = 2.0, **env: object) -> Worker:
        port = free_port()
        proc = self.start(
            "worker", "--engine", "mocker", "--model-path", str(self.model_dir),
            "--model-name", MODEL, "--speedup-ratio", str(speedup), *args,
            name="worker", system_port=port, **env,
        )
        return Worker(proc, port)

    def migrations(self) -> float:
        """kvflow_frontend_migrations_total for MODEL, from the frontend's /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        pattern = rf'^kvflow_frontend_migrations_total\{{model="{MODEL}"\}} (\S+)$'
        found = re.search(pattern, text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def live_workers(self) -> int:
        """Workers the frontend counts for MODEL right now (from its /health)."""
        return live_workers(self.url, MODEL, timeout=2)

    async def wait_workers(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.live_workers() != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"frontend sees {self.live_workers()} workers, wanted {n}")
            await asyncio.sleep(0.05)

    def client(self, **kw: object) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                                  **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def chaos(tmp_path: Path, model_dir: Path) -> Iterator[ChaosStack]:
    stack = ChaosStack(tmp_path, model_dir)
    yield stack
    stack.stop()



@pytest.fixture
def make_stack(tmp_path: Path, model_dir: Path) -> Iterator[Callable[..., ChaosStack]]:
    """Build a ChaosStack with other runtime settings (e.g. etcd discovery)."""
    stacks: list[ChaosStack] = []

    def make(**settings: object) -> ChaosStack:
        stacks.append(ChaosStack(tmp_path, model_dir, **settings))
        return stacks[-1]

    yield make
    for stack in stacks:
        stack.stop()
