"""The discovery contract: a small key-value store with leases and prefix watches."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

PUT = "put"
DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # PUT or DELETE
    key: str
    value: bytes = b""


class Watch:
    """An async iterator of WatchEvents; the snapshot comes first as PUT events."""

    def __init__(self, prefix: str, on_close: object = None) -> None:
        self.prefix = prefix
        self._queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()
        self._closed = False
        self._on_close = on_close

    def push(self, event: WatchEvent) -> None:
        if not self._closed:
            self._queue.put_nowait(event)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
            if callable(self._on_close):
                self._on_close(self)

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    async def __anext__(self) -> WatchEvent:
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event


class Discovery(abc.ABC):
    """Backends: memory, file, etcd. Keys are '/'-separated strings; values bytes.

    Each backend owns one lease for its process: `put(..., lease=True)` ties a key
    to it; when the process dies the lease expires (after `lease_ttl`) and every
    watcher sees the key deleted. Keys put with the lease are re-created by the
    backend if the store loses them (etcd restart).
    """

    name = "base"

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self, revoke: bool = True) -> None:
        """Stop keep-alives; with `revoke`, delete this process's leased keys now."""

    @property
    @abc.abstractmethod
    def lease_id(self) -> int: ...

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: bool = True) -> None: ...

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def get_prefix(self, prefix: str) -> dict[str, bytes]: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def watch_prefix(self, prefix: str) -> Watch: ...
