"""HTTP connection timeouts and limits: one timer per connection, by phase; the fd limit.

A connection is always in one phase, with one timer:

    idle    connected or between requests, nothing of the next request yet (keep-alive)
    header  the request has begun; its request line and headers are not complete
    body    headers complete; the body is not (all of it)
    ""      a complete request is queued or being served: no timer

Each phase has its own limit (`HttpTimeouts`), measured from the start of the phase,
not from the last byte, so a client trickling bytes (slowloris) cannot hold a
connection longer than the limit.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

IDLE, HEADER, BODY = "idle", "header", "body"


@dataclass(frozen=True)
class HttpTimeouts:
    idle_s: float
    header_s: float
    body_s: float

    def __post_init__(self) -> None:
        for name in ("idle_s", "header_s", "body_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HTTP {name} timeout must be > 0, got {getattr(self, name)}")

    def limit(self, phase: str) -> float:
        return {IDLE: self.idle_s, HEADER: self.header_s, BODY: self.body_s}[phase]


class PhaseTimer:
    """One connection's timer: `start(phase)` (re)arms it, `stop()` clears it, and on
    expiry `on_expired(phase)` runs."""

    __slots__ = ("_handle", "_on_expired", "_timeouts", "phase")

    def __init__(self, timeouts: HttpTimeouts, on_expired: Callable[[str], None]) -> None:
        self._timeouts = timeouts
        self._on_expired = on_expired
        self._handle: asyncio.TimerHandle | None = None
        self.phase = ""

    def start(self, phase: str) -> None:
        self.stop()
        self.phase = phase
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self._timeouts.limit(phase), self._expired)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.phase = ""

    def _expired(self) -> None:
        phase, self._handle = self.phase, None
        self._on_expired(phase)


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; returns the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft
