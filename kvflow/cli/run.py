"""`kvflow run in=<http|text|batch:FILE> out=<engine|dyn://ns.comp.ep> [flags]`.

Starts the frontend in this process and, for an engine name, one worker process
(sharing a private file-discovery directory unless discovery is configured).
Flags the frontend does not know go to the worker (engine flags, --model-path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from kvflow.cli.frontend import add_frontend_args, serve_frontend
from kvflow.cli.interactive import run_batch, run_text
from kvflow.frontend import HttpFrontend, ModelManager
from kvflow.runtime import DistributedRuntime
from kvflow.runtime.config import RuntimeConfig, add_config_args, config_from_args
from kvflow.runtime.errors import UserError
from kvflow.runtime.logs import setup_logging
from kvflow.runtime.worker import install_uvloop, run_with_runtime

log = logging.getLogger("kvflow.run")


@dataclass(frozen=True)
class RunSpec:
    input: str  # "http" | "text" | "batch:FILE"
    output: str  # engine name or dyn:// path


def split_io(argv: list[str]) -> tuple[RunSpec, list[str]]:
    io = {"in": "http", "out": "echo"}
    rest = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in io and not arg.startswith("-"):
            io[key] = value
        else:
            rest.append(arg)
    inp = io["in"]
    if inp not in ("http", "text") and not inp.startswith("batch:"):
        raise SystemExit(f"kvflow run: in= must be http, text or batch:FILE.jsonl; got {inp!r}")
    return RunSpec(inp, io["out"]), rest


def start_worker(spec: RunSpec, worker_argv: list[str], config: RuntimeConfig) -> subprocess.Popen | None:
    if spec.output.startswith(("dyn://", "kvflow://")):
        return None
    env = dict(os.environ)
    env.update(
        {
            "KVFLOW_DISCOVERY": config.discovery,
            "KVFLOW_DISCOVERY_PATH": config.discovery_path,
            "KVFLOW_NAMESPACE": config.namespace,
            "KVFLOW_EVENT_PLANE": config.event_plane,
            "KVFLOW_ETCD_ENDPOINTS": config.etcd_endpoints,
            "KVFLOW_NATS_URL": config.nats_url,
        }
    )
    cmd = [sys.executable, "-m", "kvflow.cli.main", "worker", "--engine", spec.output, *worker_argv]
    return subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _die_with_parent() -> None:
    """In the child: SIGTERM when `kvflow run` dies, even by SIGKILL (Linux prctl)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _runtime_config(ns: argparse.Namespace) -> RuntimeConfig:
    overrides = {}
    if "KVFLOW_DISCOVERY" not in os.environ and ns.discovery is None:
        overrides = {"discovery": "file", "discovery_path": tempfile.mkdtemp(prefix="kvflow-run-")}
    for key, value in overrides.items():
        if getattr(ns, key, None) is None:
            setattr(ns, key, value)
    return config_from_args(RuntimeConfig, "runtime", ns)


async def _main(
    runtime: DistributedRuntime, spec: RunSpec, ns: argparse.Namespace, worker: WorkerSlot
) -> None:
    ready: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_ready(frontend: HttpFrontend, models: ModelManager) -> None:
        ready.set_result((frontend, models))

    serving = asyncio.ensure_future(serve_frontend(runtime, ns, on_ready))
    try:
        # The port is bound before the worker starts: a taken port ends here, at once.
        await asyncio.wait({ready, serving}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            await serving  # raises why the frontend could not start
            return
        frontend, models = ready.result()
        worker.proc = start_worker(spec, worker.argv, runtime.config)
        name = await _wait_for_model(models, worker.proc)
        print(f"kvflow: model {name!r} ready at {frontend.base_url}/v1", flush=True)
        if spec.input == "text":
            await run_text(frontend.base_url, name)
        elif spec.input.startswith("batch:"):
            await run_batch(frontend.base_url, name, spec.input[len("batch:") :])
        else:
            await serving
    finally:
        runtime.initiate_shutdown()
        await serving


async def _wait_for_model(models: ModelManager, worker: subprocess.Popen | None) -> str:
    while not models.names():
        if worker is not None and worker.poll() is not None:
            raise UserError(f"the worker exited with code {worker.returncode} (its error is above)")
        await asyncio.sleep(0.05)
    return models.names()[0]


@dataclass
class WorkerSlot:
    """The worker process `kvflow run` starts once its port is bound (None for dyn:// outputs)."""

    argv: list[str]
    proc: subprocess.Popen | None = None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str]) -> int:
    spec, rest = split_io(argv)
    parser = argparse.ArgumentParser(prog="kvflow run", add_help=True)
    add_frontend_args(parser)
    add_config_args(parser.add_argument_group("runtime"), RuntimeConfig)  # type: ignore[arg-type]
    ns, worker_argv = parser.parse_known_args(rest)
    if spec.output.startswith(("dyn://", "kvflow://")):
        ns.endpoint = spec.output
    if spec.input != "http":
        ns.http_port = 0
    setup_logging()
    config = _runtime_config(ns)
    worker = WorkerSlot(worker_argv)
    install_uvloop()
    try:
        asyncio.run(run_with_runtime(_main, config, spec, ns, worker))
    finally:
        worker.stop()
    return 0
