"""`kvflow worker`: run an engine worker process."""

from __future__ import annotations

import asyncio

from kvflow.engines.worker import parse_args, run_worker, runtime_config, worker_args
from kvflow.runtime.logs import setup_logging
from kvflow.runtime.worker import install_uvloop, run_with_runtime


def main(argv: list[str]) -> int:
    ns = parse_args(argv)
    try:
        worker_args(ns)  # checks the role and transfer flags now, in one clear line
    except ValueError as exc:
        raise SystemExit(f"kvflow worker: {exc}") from None
    setup_logging()
    install_uvloop()
    asyncio.run(run_with_runtime(run_worker, runtime_config(ns), ns))
    return 0
