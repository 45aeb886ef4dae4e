"""The canary: ping each worker on the request plane between requests; a silent one is avoided.

Every `period_s` the prober sends each worker of a model a HELLO frame on its
request-plane connection (no handler, no engine work; `Client.ping`) and waits
`timeout_s` for the answer. A worker that does not answer becomes suspect in
`WorkerHealth` (no new request goes to it); suspects are pinged every sweep, and one
that answers is back in rotation. Nothing runs per token; each ping is one small
frame each way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kvflow.frontend.worker_health import WorkerHealth
from kvflow.runtime.component import PingResult
from kvflow.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Ping = Callable[[int, float], Awaitable[PingResult]]


@dataclass(frozen=True)
class CanaryConfig:
    """period_s = 0 turns the canary off (suspects then clear after Avoidance.suspect_s)."""

    period_s: float = 5.0
    timeout_s: float = 2.0
    suspect_period_s: float = 0.5  # how often suspects are pinged

    def __post_init__(self) -> None:
        if self.period_s < 0 or self.timeout_s <= 0 or self.suspect_period_s <= 0:
            raise ValueError(f"canary period must be >= 0 and timeouts > 0, got {self}")

    @property
    def enabled(self) -> bool:
        return self.period_s > 0


class Canary:
    """Pings the workers `ids()` names, and records the answers in `health`."""

    def __init__(self, config: CanaryConfig, ids: Callable[[], list[int]], ping: Ping,
                 health: WorkerHealth, on_failure: Callable[[int], None] | None = None) -> None:
        self.config = config
        self._ids = ids
        self._ping = ping
        self._health = health
        self._on_failure = on_failure
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.config.enabled and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        next_round = 0.0
        while True:
            now = time.monotonic()
            if now >= next_round:
                next_round = now + self.config.period_s
                due = self._ids()
            else:
                due = self._health.suspects()
            if due:
                await self.probe(due)
            await asyncio.sleep(self.config.suspect_period_s)

    async def probe(self, workers: list[int]) -> None:
        """Ping `workers` at once; mark each suspect or alive by its answer."""
        answers = await asyncio.gather(*(self._ping(w, self.config.timeout_s) for w in workers))
        for worker, answer in zip(workers, answers, strict=True):
            if answer.answered:
                if self._health.is_suspect(worker):
                    log.info("worker %x answers the canary again; back in rotation", worker)
                self._health.alive(worker)
            elif not self._health.is_suspect(worker):
                log.warning("worker %x did not answer the canary (%s); no new requests go to "
                            "it until it does", worker, answer.detail)
                self._health.suspect(worker)
                if self._on_failure is not None:
                    self._on_failure(worker)

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


def add_canary_args(parser: argparse.ArgumentParser) -> None:
    d = CanaryConfig()
    parser.add_argument(
        "--canary-period", dest="canary_period_s", type=float, default=d.period_s,
        help="seconds between request-plane pings of every worker; a worker that does not "
        "answer gets no new requests until it does; 0 = off (default: %(default)s)")
    parser.add_argument(
        "--canary-timeout", dest="canary_timeout_s", type=float, default=d.timeout_s,
        help="seconds a worker has to answer a ping (default: %(default)s)")


def canary_config_from_args(ns: argparse.Namespace) -> CanaryConfig:
    return CanaryConfig(period_s=ns.canary_period_s, timeout_s=ns.canary_timeout_s)
