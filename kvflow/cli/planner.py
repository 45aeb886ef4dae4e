"""`kvflow planner`: size prefill/decode (or aggregated) worker pools to TTFT/ITL targets."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from kvflow.cli.frontend import add_runtime_args
from kvflow.llm.planner_events import DECISIONS_SUBJECT, encode_decision
from kvflow.planner.config import PlannerConfig
from kvflow.planner.decide import Decision
from kvflow.planner.service import PlannerService, decision_dict
from kvflow.runtime import DistributedRuntime, RuntimeConfig
from kvflow.runtime.config import add_config_args, config_from_args
from kvflow.runtime.logs import setup_logging

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kvflow planner",
        description="Observe the frontends' /metrics every interval, predict the next interval's "
                    "load, and choose the cheapest fleet meeting the SLA. Advisory unless --apply. "
                    "Each decision is also published on the event plane of the runtime flags "
                    "below, for the frontends' /fleet page and `kvflow top`.")
    add_config_args(parser, PlannerConfig)
    add_runtime_args(parser)
    ns = parser.parse_args(argv)
    try:
        config = config_from_args(PlannerConfig, "planner", ns)
        runtime_config = config_from_args(RuntimeConfig, "runtime", ns)
        setup_logging()
        service = PlannerService(config)
    except ValueError as exc:
        print(f"kvflow planner: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_run(service, runtime_config))
    return 0


async def _run(service: PlannerService, runtime_config: RuntimeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runtime = await _publishing_runtime(runtime_config)
    model, apply = service.config.model, service.config.apply

    async def publish(decision: Decision) -> None:
        assert runtime is not None
        payload = encode_decision(decision_dict(decision), model, apply)
        await runtime.events.publish(DECISIONS_SUBJECT, payload)

    try:
        await service.run(stop, publish if runtime is not None else None)
    finally:
        if runtime is not None:
            await runtime.shutdown()


async def _publishing_runtime(config: RuntimeConfig) -> DistributedRuntime | None:
    """A runtime whose event plane carries each decision to the frontends; None (and one
    warning) when it cannot start: the planner then plans without publishing."""
    try:
        return await asyncio.wait_for(DistributedRuntime(config).start(), 30)
    except Exception as exc:  # discovery unreachable: planning matters more than the page
        log.warning("planner: cannot join the runtime (%s); decisions are logged but do not "
                    "reach the frontends' /fleet page", exc)
        return None
