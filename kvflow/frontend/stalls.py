"""Stall detection: a stream whose worker sends nothing for too long is given up as lost.

One sweeper task per routed model looks at its streams a few times a second; nothing
runs per token (a stream's `received` count is compared between sweeps). A stream is
stalled when its consumer is waiting on the worker and

- nothing arrived for longer than it may stay silent: before the first output,
  `first_output_s` plus `prefill_s_per_token` per prompt token (queueing and prefill);
  after it, `timeout_s` or `step_factor` times the stream's own mean step time,
  whichever is longer (a slow model gets a longer leash); or
- its worker left discovery (lease expired) and nothing arrived for `gone_s` — a
  draining worker also leaves discovery, but keeps streaming, so it is not cut off.

A stalled stream is abandoned: CANCEL goes to the worker (it frees the request when
it wakes) and the consumer sees `WorkerStalledError`, which the routed client turns
into WorkerLost — the request migrates exactly as after a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple

from kvflow.runtime.errors import WorkerStalledError
from kvflow.runtime.request_plane.stream import ResponseStream
from kvflow.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StallConfig:
    """How long a worker may stay silent on a stream; timeout_s = 0 turns detection off."""

    timeout_s: float = 20.0
    first_output_s: float = 60.0
    prefill_s_per_token: float = 0.001
    step_factor: float = 50.0
    gone_s: float = 3.0
    sweep_s: float = 0.25

    def __post_init__(self) -> None:
        for name in ("timeout_s", "first_output_s", "prefill_s_per_token", "step_factor",
                     "gone_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"stall {name} must be >= 0, got {getattr(self, name)}")
        if self.sweep_s <= 0:
            raise ValueError(f"stall sweep_s must be > 0, got {self.sweep_s}")

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def allowed_silence(self, prompt_tokens: int, outputs: int, producing_s: float) -> float:
        """Seconds a stream may wait for its next output, given what it produced so far."""
        if outputs == 0:
            return self.first_output_s + prompt_tokens * self.prefill_s_per_token
        mean_step = producing_s / max(outputs - 1, 1)
        return max(self.timeout_s, self.step_factor * mean_step)


class Stall(NamedTuple):
    """Why a stream counts as stalled: `kind` "silent" or "gone", and the details."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return self.detail


class StallWatch:
    """One stream under watch: what the sweeper saw of it, and whether it stalled."""

    __slots__ = ("first_at", "last_at", "prompt_tokens", "seen", "stalled", "stream", "worker")

    def __init__(self, worker: int, prompt_tokens: int) -> None:
        self.worker = worker
        self.prompt_tokens = prompt_tokens
        self.stream: ResponseStream | None = None
        now = time.monotonic()
        self.first_at = 0.0
        self.last_at = now
        self.seen = 0
        self.stalled: Stall | None = None

    def attach(self, stream: ResponseStream) -> None:
        self.stream = stream

    def check(self, config: StallConfig, registered: bool, now: float) -> Stall | None:
        """None while healthy; otherwise why the stream counts as stalled."""
        stream = self.stream
        if stream is None:
            return None
        if stream.received != self.seen:
            if not self.seen:
                self.first_at = now
            self.seen, self.last_at = stream.received, now
            return None
        if not stream.waiting:  # the consumer is busy (slow client): not the worker's fault
            self.last_at = now
            return None
        silent = now - self.last_at
        if not registered and silent > config.gone_s:
            return Stall("gone", f"it left discovery (lease expired) and sent nothing for "
                         f"{silent:.1f}s")
        limit = config.allowed_silence(self.prompt_tokens, self.seen, self.last_at - self.first_at)
        if silent > limit:
            return Stall("silent", f"it sent nothing for {silent:.1f}s (allowed {limit:.1f}s)")
        return None


class StallMonitor:
    """Sweeps the watched streams of one model; abandons stalled ones."""

    def __init__(self, config: StallConfig, registered: Callable[[], Collection[int]],
                 on_stall: Callable[[StallWatch], None]) -> None:
        self.config = config
        self._registered = registered  # the workers in discovery now
        self._on_stall = on_stall
        self._watches: set[StallWatch] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(self, worker: int, prompt_tokens: int) -> StallWatch:
        w = StallWatch(worker, prompt_tokens)
        if self.config.enabled:
            self._watches.add(w)
            if self._task is None:
                self._task = asyncio.ensure_future(self._sweep_forever())
        return w

    def unwatch(self, w: StallWatch) -> None:
        self._watches.discard(w)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_s)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        if not self._watches:
            return
        registered = set(self._registered())
        for w in list(self._watches):
            why = w.check(self.config, w.worker in registered, now)
            if why is not None:
                self._stall(w, why)

    def _stall(self, w: StallWatch, why: Stall) -> None:
        self._watches.discard(w)
        w.stalled = why
        log.warning("worker %x stalled on a stream: %s; cancelling it there and moving the "
                    "request", w.worker, why)
        self._on_stall(w)
        assert w.stream is not None
        w.stream.abandon(WorkerStalledError(f"worker {w.worker:x} stalled: {why}",
                                            instance_id=w.worker))

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


def add_stall_args(parser: argparse.ArgumentParser) -> None:
    """--stall-timeout and --stall-first-output-timeout (defaults from StallConfig)."""
    d = StallConfig()
    parser.add_argument(
        "--stall-timeout", dest="stall_timeout_s", type=float, default=d.timeout_s,
        help="seconds a worker may send nothing on a producing stream before the request "
        "moves to another worker (longer for slow models: 50 mean steps); 0 = off "
        "(default: %(default)s)")
    parser.add_argument(
        "--stall-first-output-timeout", dest="stall_first_output_s", type=float,
        default=d.first_output_s,
        help="seconds a worker may take to its first output, plus 1 ms per prompt token "
        "(default: %(default)s)")


def stall_config_from_args(ns: argparse.Namespace) -> StallConfig:
    return StallConfig(timeout_s=ns.stall_timeout_s, first_output_s=ns.stall_first_output_s)
