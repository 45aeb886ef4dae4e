"""`kvflow run in=<http|text|batch:FILE> out=<engine|dyn://ns.comp.ep> [flags]`.

Starts the frontend in this process and, for an engine name, one worker process — or
`--prefill-workers N --decode-workers M` disaggregated ones — (sharing a private
file-discovery directory unless discovery is configured).
Flags the frontend does not know go to the worker (engine flags, --model-path).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, field

import msgspec

from kvflow.cli.frontend import add_frontend_args, add_runtime_args, serve_frontend
from kvflow.cli.help import new_parser
from kvflow.cli.interactive import run_batch, run_text
from kvflow.frontend import HttpFrontend, ModelManager
from kvflow.llm.register import MODELS_PREFIX, ROLE_DECODE, ROLE_PREFILL, ModelEntry
from kvflow.runtime import DistributedRuntime, launcher
from kvflow.runtime.config import RuntimeConfig, config_from_args
from kvflow.runtime.errors import UserError
from kvflow.runtime.flags import parse_layered
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
        raise UserError(f"in= must be http, text or batch:FILE.jsonl; got {inp!r} (see kvflow run --help)")
    return RunSpec(inp, io["out"]), rest


def start_workers(spec: RunSpec, worker_argv: list[str], config: RuntimeConfig,
                  config_file: str | None, prefill: int = 0, decode: int = 0) -> list[subprocess.Popen]:
    """One aggregated worker, or `prefill` + `decode` disaggregated ones (none for dyn://)."""
    if spec.output.startswith(("dyn://", "kvflow://")):
        return []
    if not prefill and not decode:
        return [start_worker(spec, worker_argv, config, config_file)]
    roles = [ROLE_PREFILL] * prefill + [ROLE_DECODE] * decode
    return [start_worker(spec, [*worker_argv, "--role", role], config, config_file) for role in roles]


def start_worker(
    spec: RunSpec, worker_argv: list[str], config: RuntimeConfig, config_file: str | None = None
) -> subprocess.Popen:
    return launcher.launch("worker", ["--engine", spec.output, *worker_argv],
                           launcher.child_env(config, config_file))


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
        worker.procs = start_workers(spec, worker.argv, runtime.config, ns.config,
                                     ns.prefill_workers, ns.decode_workers)
        name = await _wait_for_model(models, worker.procs)
        await _wait_for_roles(runtime, ns.prefill_workers, ns.decode_workers, worker.procs)
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


def _check_alive(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is not None:
            raise UserError(f"the worker exited with code {worker.returncode} (its error is above)")


async def _wait_for_model(models: ModelManager, workers: list[subprocess.Popen]) -> str:
    while not models.names():
        _check_alive(workers)
        await asyncio.sleep(0.05)
    return models.names()[0]


async def _wait_for_roles(
    runtime: DistributedRuntime, prefill: int, decode: int, workers: list[subprocess.Popen]
) -> None:
    """A disaggregated stack is ready once every prefill and decode worker registered."""
    decoder = msgspec.msgpack.Decoder(ModelEntry)
    while prefill or decode:
        found = (await runtime.discovery.get_prefix(MODELS_PREFIX)).values()
        roles = [decoder.decode(v).role for v in found]
        if roles.count(ROLE_PREFILL) >= prefill and roles.count(ROLE_DECODE) >= decode:
            await asyncio.sleep(0.2)  # the frontend's watcher applies the last entries
            return
        _check_alive(workers)
        await asyncio.sleep(0.05)


@dataclass
class WorkerSlot:
    """The worker processes `kvflow run` starts once its port is bound (none for dyn://)."""

    argv: list[str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def stop(self, timeout: float = 30.0) -> None:
        launcher.stop(self.procs, timeout)


RUN_HELP = """Run a whole local stack in one command: the frontend in this process, and for
out=ENGINE one worker process beside it (sharing a private file-discovery directory unless
--discovery is given).

  in=http             serve the OpenAI-compatible API on --http-port (default)
  in=text             chat in the terminal (an empty line or Ctrl-D ends)
  in=batch:FILE       send each line of FILE (JSON Lines) and write FILE.out.jsonl; a line is a
                      request body: {"messages": [...]} goes to /v1/chat/completions,
                      {"prompt": "..."} to /v1/completions ("model" may be left out); a line
                      that is not a JSON object is reported with its number and skipped
  out=ENGINE          echo, mocker or native: start a worker with that engine
  out=dyn://NS.COMP.EP  serve workers already registered on that endpoint
  --prefill-workers N --decode-workers M
                      a disaggregated stack: N prefill and M decode workers instead of one

Worker and engine flags (--model-path, --block-size, ...) pass through to the worker.

examples:
  kvflow run in=http out=echo --model-path DIR
  kvflow run in=text out=mocker --model-path DIR --speedup-ratio 10
  kvflow run in=batch:requests.jsonl out=echo --model-path DIR
"""


def build_parser(engine: str | None = None, for_help: bool = False) -> argparse.ArgumentParser:
    """Frontend and runtime flags; with `for_help` also the worker's and the engine's (shown only)."""
    parser = new_parser("kvflow run", RUN_HELP)
    parser.usage = "kvflow run in=<http|text|batch:FILE> out=<ENGINE|dyn://ns.comp.ep> [flags]"
    add_frontend_args(parser)
    add_runtime_args(parser)
    g = parser.add_argument_group("disaggregated stack")
    g.add_argument("--prefill-workers", type=int, default=0,
                   help="prefill worker processes (with --decode-workers; default: one aggregated)")
    g.add_argument("--decode-workers", type=int, default=0, help="decode worker processes")
    if for_help:
        from kvflow.engines.base import engine_names, get_engine
        from kvflow.engines.worker import add_worker_args

        parser.conflict_handler = "resolve"  # --migration-limit: the frontend's takes it in run
        add_worker_args(parser)
        if engine in engine_names():
            get_engine(engine).add_args(parser)
    return parser


def check_worker_args(spec: RunSpec, worker_argv: list[str], config_file: str | None) -> None:
    """Parse the worker's flags here, so a mistake is reported before anything starts."""
    if spec.output.startswith(("dyn://", "kvflow://")):
        return
    from kvflow.engines.worker import parse_args

    parse_args(["--engine", spec.output, *(["--config", config_file] if config_file else []), *worker_argv])


def main(argv: list[str]) -> int:
    if not argv:
        build_parser(for_help=True).print_help()
        return 0
    spec, rest = split_io(argv)
    if "-h" in rest or "--help" in rest:
        build_parser(spec.output, for_help=True).print_help()
        return 0
    ns, worker_argv = parse_layered(build_parser(), rest, known_only=True)
    if (ns.prefill_workers > 0) != (ns.decode_workers > 0) or min(ns.prefill_workers,
                                                                     ns.decode_workers) < 0:
        raise UserError("give both --prefill-workers and --decode-workers (>= 1), or neither")
    check_worker_args(spec, worker_argv, ns.config)
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
