"""`kvflow run in=<http|text|batch:FILE> out=<engine|dyn://ns.comp.ep> [flags]`.

Starts the frontend in this process and, for an engine name, one worker process
(sharing a private file-discovery directory unless discovery is configured).
Flags the frontend does not know go to the worker (engine flags, --model-path).
`--prefill-workers N --decode-workers M` starts N `--role prefill` and M `--role decode`
worker processes instead: a disaggregated stack in one command.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import msgspec

from kvflow.cli.frontend import add_frontend_args, serve_frontend
from kvflow.cli.interactive import run_batch, run_text
from kvflow.frontend import HttpFrontend, ModelManager
from kvflow.llm.register import MODELS_PREFIX, ROLE_DECODE, ROLE_PREFILL, ModelEntry
from kvflow.runtime import DistributedRuntime
from kvflow.runtime.config import RuntimeConfig, add_config_args, config_from_args
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


def start_workers(
    spec: RunSpec, worker_argv: list[str], config: RuntimeConfig, prefill: int, decode: int
) -> list[subprocess.Popen]:
    """One aggregated worker, or `prefill` + `decode` disaggregated ones."""
    if spec.output.startswith(("dyn://", "kvflow://")):
        return []
    if not prefill and not decode:
        return [start_worker(spec, worker_argv, config)]
    roles = ["prefill"] * prefill + ["decode"] * decode
    return [start_worker(spec, [*worker_argv, "--role", role], config) for role in roles]


def start_worker(spec: RunSpec, worker_argv: list[str], config: RuntimeConfig) -> subprocess.Popen:
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
    return subprocess.Popen(cmd, env=env)


def _runtime_config(ns: argparse.Namespace) -> RuntimeConfig:
    overrides = {}
    if "KVFLOW_DISCOVERY" not in os.environ and ns.discovery is None:
        overrides = {"discovery": "file", "discovery_path": tempfile.mkdtemp(prefix="kvflow-run-")}
    for key, value in overrides.items():
        if getattr(ns, key, None) is None:
            setattr(ns, key, value)
    return config_from_args(RuntimeConfig, "runtime", ns)


async def _main(
    runtime: DistributedRuntime, spec: RunSpec, ns: argparse.Namespace,
    workers: list[subprocess.Popen],
) -> None:
    ready: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_ready(frontend: HttpFrontend, models: ModelManager) -> None:
        ready.set_result((frontend, models))

    serving = asyncio.ensure_future(serve_frontend(runtime, ns, on_ready))
    frontend, models = await ready
    try:
        name = await _wait_for_model(models, workers)
        await _wait_for_roles(runtime, ns.prefill_workers, ns.decode_workers, workers)
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


async def _wait_for_model(models: ModelManager, workers: list[subprocess.Popen]) -> str:
    while not models.names():
        for worker in workers:
            if worker.poll() is not None:
                raise SystemExit(f"kvflow run: a worker exited with code {worker.returncode}")
        await asyncio.sleep(0.05)
    return models.names()[0]


async def _wait_for_roles(
    runtime: DistributedRuntime, prefill: int, decode: int, workers: list[subprocess.Popen]
) -> None:
    """A disaggregated stack is ready once every prefill and decode worker registered."""
    decoder = msgspec.msgpack.Decoder(ModelEntry)
    while prefill or decode:
        entries = [decoder.decode(v) for v in (await runtime.discovery.get_prefix(MODELS_PREFIX)).values()]
        roles = [e.role for e in entries]
        if roles.count(ROLE_PREFILL) >= prefill and roles.count(ROLE_DECODE) >= decode:
            await asyncio.sleep(0.2)  # the frontend's watcher applies the last entries
            return
        for worker in workers:
            if worker.poll() is not None:
                raise SystemExit(f"kvflow run: a worker exited with code {worker.returncode}")
        await asyncio.sleep(0.05)


def main(argv: list[str]) -> int:
    spec, rest = split_io(argv)
    parser = argparse.ArgumentParser(prog="kvflow run", add_help=True)
    add_frontend_args(parser)
    add_config_args(parser.add_argument_group("runtime"), RuntimeConfig)  # type: ignore[arg-type]
    g = parser.add_argument_group("disaggregated stack")
    g.add_argument("--prefill-workers", type=int, default=0, help="prefill worker processes")
    g.add_argument("--decode-workers", type=int, default=0, help="decode worker processes")
    ns, worker_argv = parser.parse_known_args(rest)
    if (ns.prefill_workers > 0) != (ns.decode_workers > 0) or min(ns.prefill_workers,
                                                                     ns.decode_workers) < 0:
        raise SystemExit("kvflow run: give both --prefill-workers and --decode-workers (>= 1), "
                         "or neither")
    if spec.output.startswith(("dyn://", "kvflow://")):
        ns.endpoint = spec.output
    if spec.input != "http":
        ns.http_port = 0
    setup_logging()
    config = _runtime_config(ns)
    workers = start_workers(spec, worker_argv, config, ns.prefill_workers, ns.decode_workers)
    install_uvloop()
    try:
        asyncio.run(run_with_runtime(_main, config, spec, ns, workers))
    except KeyboardInterrupt:
        pass
    finally:
        _stop(workers)
    return 0


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
