"""WorkerHealth: the one place that says which workers new requests should avoid, and why.

Two kinds of trouble, two rules:

- lost (its connection dropped, it refused the stream): avoided for `down_s` seconds —
  discovery drops a dead worker within its lease TTL, and a draining one soon after;
- suspect (a stream from it stalled, or it did not answer the canary): avoided until it
  proves alive again — a canary ping it answers (frontend.canary), or, with the canary
  off, `suspect_s` seconds.

When every candidate is merely lost, requests still go to them (better than none);
a suspect worker is never chosen while it is suspect.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class Avoidance:
    """How long workers stay avoided."""

    down_s: float = 2.0  # after a lost connection or a refused stream
    suspect_s: float = 30.0  # after a stall, when nothing (no canary) can clear it sooner


class WorkerHealth:
    """Per worker: avoided until when (lost), or suspect until it answers a ping."""

    def __init__(self, avoidance: Avoidance | None = None, *, proof_by_ping: bool = False) -> None:
        self.avoidance = avoidance or Avoidance()
        self.proof_by_ping = proof_by_ping
        self._down: dict[int, float] = {}  # worker -> monotonic time it may be tried again
        self._suspect: dict[int, float] = {}  # worker -> when it became suspect

    def lost(self, worker: int) -> None:
        """Its connection dropped or it refused: avoid it for a short while."""
        self._down[worker] = time.monotonic() + self.avoidance.down_s

    def suspect(self, worker: int) -> None:
        """It stalled or missed a canary: avoid it until it proves alive."""
        self._suspect.setdefault(worker, time.monotonic())

    def alive(self, worker: int) -> None:
        """It answered a ping: it may take requests again."""
        self._suspect.pop(worker, None)
        self._down.pop(worker, None)

    def suspects(self) -> list[int]:
        self._expire()
        return sorted(self._suspect)

    def is_suspect(self, worker: int) -> bool:
        return worker in self._suspect

    def forget(self, live: Collection[int]) -> None:
        """Drop what is known about workers no longer in discovery (a suspect is kept a
        while: one whose lease expired while it hung stays suspect when it re-registers,
        until it answers a ping)."""
        for worker in [w for w in self._down if w not in live]:
            del self._down[worker]
        cutoff = time.monotonic() - self.avoidance.suspect_s
        for worker in [w for w, t in self._suspect.items() if w not in live and t < cutoff]:
            del self._suspect[worker]

    def usable(self, ids: list[int], exclude: Collection[int] = ()) -> list[int]:
        """Those of `ids` a request may use: not excluded, not suspect, and not recently
        lost unless only recently lost ones remain."""
        self._expire()
        usable = [w for w in ids if w not in exclude and w not in self._suspect]
        if self._down:
            now = time.monotonic()
            self._down = {w: t for w, t in self._down.items() if t > now}
            usable = [w for w in usable if w not in self._down] or usable
        return usable

    def _expire(self) -> None:
        if self.proof_by_ping or not self._suspect:
            return
        cutoff = time.monotonic() - self.avoidance.suspect_s
        self._suspect = {w: t for w, t in self._suspect.items() if t > cutoff}
