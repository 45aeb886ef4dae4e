"""Every kvflow process ends promptly on SIGINT/SIGTERM, in every state; a taken port is one line."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from kvflow.testing.procs import Proc, kvflow_proc


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _gone(pid: int) -> bool:
    """Exited (reaped, or a zombie waiting for its new parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def _exit_code(proc: Proc, timeout: float) -> int:
    return proc.popen.wait(timeout)


@pytest.fixture
def taken_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def test_taken_port_is_one_line_and_no_worker(stack, model_dir, taken_port) -> None:
    t0 = time.monotonic()
    proc = stack.start("run", "in=http", "out=echo", "--model-path", str(model_dir),
                       "--http-port", str(taken_port))
    assert _exit_code(proc, 30) == 2
    assert time.monotonic() - t0 < 20
    out = proc.output()
    assert f"port {taken_port}" in out and "--http-port" in out
    assert "Traceback" not in out and "worker: engine=" not in out  # no worker was started


def test_frontend_taken_port(stack, taken_port) -> None:
    proc = stack.start("frontend", "--http-port", str(taken_port))
    assert _exit_code(proc, 30) == 2
    assert "--http-port" in proc.output() and "Traceback" not in proc.output()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_stops_with_its_worker(stack, model_dir, sig) -> None:
    proc = stack.start("run", "in=http", "out=echo", "--model-path", str(model_dir), "--http-port", "0")
    proc.wait_for_output("ready at", timeout=60)
    workers = _children(proc.pid)
    assert len(workers) == 1
    t0 = time.monotonic()
    proc.signal(sig)
    assert _exit_code(proc, 20) == 0
    assert time.monotonic() - t0 < 15
    assert _wait_gone(workers[0], 10), "the worker outlived kvflow run"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_stops_while_waiting_for_a_model(stack, sig) -> None:
    # out=dyn://… waits for a worker that never comes: the startup state.
    proc = stack.start("run", "in=http", "out=dyn://nobody.here.generate", "--http-port", "0")
    proc.wait_for_output("listening on", timeout=60)
    time.sleep(0.3)
    proc.signal(sig)
    assert _exit_code(proc, 15) == 0
    assert "Traceback" not in proc.output()


def test_killed_run_takes_its_worker_along(stack, model_dir) -> None:
    proc = stack.start("run", "in=http", "out=echo", "--model-path", str(model_dir), "--http-port", "0")
    proc.wait_for_output("ready at", timeout=60)
    workers = _children(proc.pid)
    proc.kill()
    assert workers and _wait_gone(workers[0], 15), "the worker was orphaned"


def test_worker_stops_while_loading(stack, tmp_path) -> None:
    """SIGTERM while the native engine loads its model and sizes its cache ends the worker at once."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvflow.testing.models import make_tiny_model

    model = make_tiny_model(tmp_path / "tinyw")
    proc = stack.start("worker", "--engine", "native", "--model-path", str(model), name="worker")
    proc.wait_for_output("worker: engine=native", timeout=60)
    t0 = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert _exit_code(proc, 20) == 0
    assert time.monotonic() - t0 < 8, "the worker waited for its loading thread"
    assert "Traceback" not in proc.output(), proc.output()


def test_unreachable_etcd_is_one_line(stack, model_dir) -> None:
    env = {**stack.env, "KVFLOW_DISCOVERY": "etcd", "KVFLOW_ETCD_ENDPOINTS": "http://127.0.0.1:9"}
    proc = kvflow_proc("worker", "--engine", "echo", "--model-path", str(model_dir), env=env,
                       log_dir=stack.log_dir, name="worker")
    stack.procs.append(proc)
    assert _exit_code(proc, 30) == 2
    assert "cannot reach etcd" in proc.output() and "Traceback" not in proc.output()
