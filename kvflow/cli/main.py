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
"""

from __future__ import annotations

import sys

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
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name = argv.pop(0)
    if name not in COMMANDS:
        print(f"kvflow: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[name])
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
