"""The event-plane contract: publish bytes on a subject, subscribe with wildcards.

Subjects are '.'-separated tokens. In a subscription pattern '*' matches one
token and '>' (last token only) matches one or more, as in NATS.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable


def subject_matches(pattern: str, subject: str) -> bool:
    if "*" not in pattern and ">" not in pattern:
        return pattern == subject
    pt, st = pattern.split("."), subject.split(".")
    for i, tok in enumerate(pt):
        if tok == ">":
            return len(st) > i
        if i >= len(st) or (tok != "*" and tok != st[i]):
            return False
    return len(pt) == len(st)


def literal_prefix(pattern: str) -> str:
    """The part of a pattern before its first wildcard token (for prefix filters)."""
    out = []
    for tok in pattern.split("."):
        if tok in ("*", ">"):
            out.append("")
            break
        out.append(tok)
    return ".".join(out)


class Subscription:
    """Async iterator of payloads (bytes) published on matching subjects."""

    def __init__(
        self, pattern: str, on_close: Callable[[Subscription], None] | None = None, max_pending: int = 100_000
    ) -> None:
        self.pattern = pattern
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._on_close = on_close
        self._closed = False
        self.max_pending = max_pending
        self.dropped = 0
        self.last_subject = ""

    def matches(self, subject: str) -> bool:
        return subject_matches(self.pattern, subject)

    def deliver(self, subject: str, payload: bytes) -> None:
        if self._closed:
            return
        if self._queue.qsize() >= self.max_pending:
            self.dropped += 1  # a slow consumer loses events, never the publisher's memory
            return
        self.last_subject = subject
        self._queue.put_nowait(payload)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
            if self._on_close is not None:
                self._on_close(self)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        return item


class EventPlane(abc.ABC):
    name = "base"

    def __init__(self) -> None:
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for sub in list(self._subs):
            sub.close()

    @abc.abstractmethod
    async def publish(self, subject: str, payload: bytes) -> None: ...

    def subscribe(self, pattern: str) -> Subscription:
        sub = Subscription(pattern, on_close=self._unsubscribe)
        self._subs.append(sub)
        self._on_subscribe(sub)
        return sub

    def _on_subscribe(self, sub: Subscription) -> None:
        return None

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def _dispatch(self, subject: str, payload: bytes) -> None:
        for sub in self._subs:
            if sub.matches(subject):
                sub.deliver(subject, payload)


class ScopedEvents:
    """An event plane seen from one namespace: subjects are prefixed `<ns>.`."""

    def __init__(self, plane: EventPlane, namespace: str) -> None:
        self.plane = plane
        self.namespace = namespace

    def _full(self, subject: str) -> str:
        return f"{self.namespace}.{subject}"

    async def publish(self, subject: str, payload: bytes) -> None:
        await self.plane.publish(self._full(subject), payload)

    def subscribe(self, subject: str) -> Subscription:
        return self.plane.subscribe(self._full(subject))
