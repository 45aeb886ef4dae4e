"""`kvflow worker`: run an engine worker process."""

from __future__ import annotations

import asyncio
import sys

from kvflow.engines.worker import parse_args, run_worker, runtime_config
from kvflow.runtime.errors import KvflowError
from kvflow.runtime.logs import setup_logging
from kvflow.runtime.worker import install_uvloop, run_with_runtime


def main(argv: list[str]) -> int:
    ns = parse_args(argv)
    setup_logging()
    install_uvloop()
    try:
        asyncio.run(run_with_runtime(run_worker, runtime_config(ns), ns))
    except KvflowError as exc:  # a user mistake (missing engine, block size mismatch): one line
        print(f"kvflow worker: {exc}", file=sys.stderr)
        return 1
    return 0
