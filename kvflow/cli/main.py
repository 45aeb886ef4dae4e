"""`kvflow` command line: run a whole local stack, or start each part by itself.

kvflow run in=http out=echo --model-path DIR     frontend + worker, one command
kvflow frontend [--http-port 8000]               the OpenAI-compatible frontend
kvflow worker --engine mocker --model-path DIR   an engine worker
kvflow router                                    the standalone KV router service
kvflow make-test-model DIR [--weights]           a tiny random model for trying things
kvflow operator run|crds|render                  the Kubernetes operator (docs/kubernetes.md)
kvflow planner [--apply]                         size worker pools to TTFT/ITL targets
kvflow replay TRACE --url URL | --simulate       replay a timestamped trace, report SLA attainment
kvflow profile --out PERF.json ENGINE [ARGS]     measure a worker for the planner
kvflow top [--url http://127.0.0.1:8000]         the live fleet view in a terminal

`kvflow COMMAND --help` lists a command's flags; `--debug` shows tracebacks for errors;
`kvflow --version` prints the version.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading

from kvflow.runtime.errors import UserError

COMMANDS = {
    "run": "kvflow.cli.run",
    "frontend": "kvflow.cli.frontend",
    "worker": "kvflow.cli.worker",
    "router": "kvflow.cli.router",
    "make-test-model": "kvflow.cli.test_model",
    "operator": "kvflow.cli.operator",
    "planner": "kvflow.cli.planner",
    "replay": "kvflow.cli.replay",
    "profile": "kvflow.cli.profile",
    "top": "kvflow.cli.top",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("KVFLOW_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ["KVFLOW_DEBUG"] = "1"  # child processes (kvflow run's worker) show tracebacks too
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"kvflow {version()}")
        return 0
    name = argv.pop(0)
    if name not in COMMANDS:
        print(f"kvflow: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return exit_promptly(run_command(name, argv, debug))


def run_command(name: str, argv: list[str], debug: bool) -> int:
    """Run one command; a UserError is one line on stderr (a traceback only with --debug)."""
    try:
        module = importlib.import_module(COMMANDS[name])
        return int(module.main(argv) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"kvflow {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def exit_promptly(code: int) -> int:
    """The command is done: do not wait for leftover threads (an engine still loading, say).

    Daemon threads count too: one inside torch while the interpreter finalizes aborts it.
    """
    if any(t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("kvflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
