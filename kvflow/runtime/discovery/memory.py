"""In-process discovery: a dict and watchers, for components sharing one process."""

from __future__ import annotations

import random

from kvflow.runtime.discovery.base import DELETE, PUT, Discovery, Watch, WatchEvent


class MemoryStore:
    """The shared state behind every MemoryDiscovery of a process."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int | None]] = {}
        self.watches: list[Watch] = []

    def notify(self, event: WatchEvent) -> None:
        for w in self.watches:
            if event.key.startswith(w.prefix):
                w.push(event)


_STORE = MemoryStore()


class MemoryDiscovery(Discovery):
    name = "memory"

    def __init__(self, store: MemoryStore | None = None) -> None:
        self._store = store or _STORE
        self._lease = random.getrandbits(63) or 1

    async def start(self) -> None:
        return None

    async def close(self, revoke: bool = True) -> None:
        if revoke:
            owned = [k for k, (_, lease) in self._store.data.items() if lease == self._lease]
            for key in owned:
                await self.delete(key)

    @property
    def lease_id(self) -> int:
        return self._lease

    async def put(self, key: str, value: bytes, *, lease: bool = True) -> None:
        self._store.data[key] = (value, self._lease if lease else None)
        self._store.notify(WatchEvent(PUT, key, value))

    async def get(self, key: str) -> bytes | None:
        item = self._store.data.get(key)
        return item[0] if item else None

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, (v, _) in self._store.data.items() if k.startswith(prefix)}

    async def delete(self, key: str) -> None:
        if self._store.data.pop(key, None) is not None:
            self._store.notify(WatchEvent(DELETE, key))

    def watch_prefix(self, prefix: str) -> Watch:
        watch = Watch(prefix, on_close=self._store.watches.remove)
        for key, (value, _) in sorted(self._store.data.items()):
            if key.startswith(prefix):
                watch.push(WatchEvent(PUT, key, value))
        self._store.watches.append(watch)
        return watch
