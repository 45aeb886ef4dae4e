"""Fixtures for runtime tests: a discovery setting shared by test and worker processes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvflow.runtime import DistributedRuntime, RuntimeConfig
from kvflow.testing.procs import Proc, python_proc, runtime_env

WORKER_APP = Path(__file__).with_name("worker_app.py")


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[object]:
    from kvflow.testing.servers import EtcdServer

    with EtcdServer() as server:
        yield server


@dataclass
class Cluster:
    """Settings shared by the test's runtime and the worker processes it starts."""

    settings: dict
    log_dir: Path
    procs: list[Proc]

    def config(self) -> RuntimeConfig:
        return RuntimeConfig(**self.settings)

    def env(self) -> dict[str, str]:
        return runtime_env(**self.settings)

    def start_worker(self, **extra: object) -> Proc:
        env = self.env()
        for k, v in extra.items():
            env["KVFLOW_" + k.upper()] = str(v)
        proc = python_proc(WORKER_APP, env=env, log_dir=self.log_dir, name="worker")
        self.procs.append(proc)
        return proc


def _settings(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict:
    base = {
        "namespace": "t" + uuid.uuid4().hex[:8],
        "lease_ttl": 1.0,
        "event_plane": "zmq",
        "graceful_shutdown_timeout": 10.0,
    }
    if kind == "file":
        return {
            **base,
            "discovery": "file",
            "discovery_path": str(tmp_path / "discovery"),
            "file_poll_interval": 0.05,
        }
    etcd = request.getfixturevalue("etcd_server")
    return {**base, "discovery": "etcd", "etcd_endpoints": etcd.endpoints}  # type: ignore[attr-defined]


@pytest.fixture(params=["file", "etcd"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(_settings(request.param, tmp_path, request), tmp_path / "logs", [])
    yield c
    for proc in c.procs:
        proc.stop()


@pytest.fixture
def file_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(_settings("file", tmp_path, request), tmp_path / "logs", [])
    yield c
    for proc in c.procs:
        proc.stop()


@pytest.fixture
async def runtime(cluster: Cluster) -> AsyncIterator[DistributedRuntime]:
    rt = await DistributedRuntime(cluster.config()).start()
    yield rt
    await rt.shutdown()


@pytest.fixture
async def file_runtime(file_cluster: Cluster) -> AsyncIterator[DistributedRuntime]:
    rt = await DistributedRuntime(file_cluster.config()).start()
    yield rt
    await rt.shutdown()
