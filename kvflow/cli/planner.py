"""`kvflow planner`: size prefill/decode (or aggregated) worker pools to TTFT/ITL targets."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from kvflow.planner.config import PlannerConfig
from kvflow.planner.service import PlannerService
from kvflow.runtime.config import add_config_args, config_from_args
from kvflow.runtime.logs import setup_logging


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kvflow planner",
        description="Observe the frontends' /metrics every interval, predict the next interval's "
                    "load, and choose the cheapest fleet meeting the SLA. Advisory unless --apply.")
    add_config_args(parser, PlannerConfig)
    ns = parser.parse_args(argv)
    try:
        config = config_from_args(PlannerConfig, "planner", ns)
        setup_logging()
        service = PlannerService(config)
    except ValueError as exc:
        print(f"kvflow planner: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_run(service))
    return 0


async def _run(service: PlannerService) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.run(stop)
