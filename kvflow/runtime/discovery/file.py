"""Discovery through a directory shared by the processes of one host.

Layout under `root`:
    leases/<lease hex>   heartbeat file; its mtime is refreshed every ttl/3
    keys/<quoted key>    msgpack [key, value, lease hex or ""], written atomically

A key tied to a lease is live while its lease file exists and is younger than the
lease's TTL. Watchers poll the directory (one poller per process) and garbage
collect keys whose lease has expired, so a `kill -9`ed process vanishes from every
watcher within the TTL plus one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import time
from pathlib import Path
from urllib.parse import quote

import msgspec

from kvflow.runtime.discovery.base import DELETE, PUT, Discovery, Watch, WatchEvent

log = logging.getLogger(__name__)


class _Entry(msgspec.Struct, array_like=True):
    key: str
    value: bytes
    lease: str


def _file_name(key: str) -> str:
    name = quote(key, safe="")
    if len(name) > 200:
        name = "h-" + hashlib.sha256(key.encode()).hexdigest()
    return name


class FileDiscovery(Discovery):
    name = "file"

    def __init__(self, root: str | Path, lease_ttl: float = 10.0, poll_interval: float = 0.1):
        self.root = Path(root)
        self.ttl = lease_ttl
        self.poll_interval = poll_interval
        self._lease = random.getrandbits(63) or 1
        self._lease_hex = f"{self._lease:016x}"
        self._owned: dict[str, bytes] = {}
        self._watches: list[Watch] = []
        self._view: dict[str, bytes] = {}
        self._file_cache: dict[str, tuple[tuple[int, int, int], _Entry | None]] = {}
        self._lease_ttl_cache: dict[str, float] = {}
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        for sub in ("leases", "keys", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_lease()
        self._tasks.append(asyncio.ensure_future(self._keepalive()))

    async def close(self, revoke: bool = True) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for w in list(self._watches):
            w.close()
        if revoke:
            for key in list(self._owned):
                self._unlink(self._key_path(key))
            self._owned.clear()
            self._unlink(self.root / "leases" / self._lease_hex)

    @property
    def lease_id(self) -> int:
        return self._lease

    # -- key/value ---------------------------------------------------------------
    async def put(self, key: str, value: bytes, *, lease: bool = True) -> None:
        entry = _Entry(key, value, self._lease_hex if lease else "")
        self._atomic_write(self._key_path(key), msgspec.msgpack.encode(entry))
        if lease:
            self._owned[key] = value
        self._wake.set()

    async def get(self, key: str) -> bytes | None:
        entry = self._read(self._key_path(key))
        if entry is None or not self._alive(entry.lease, time.time()):
            return None
        return entry.value

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self._scan().items() if k.startswith(prefix)}

    async def delete(self, key: str) -> None:
        self._owned.pop(key, None)
        self._unlink(self._key_path(key))
        self._wake.set()

    def watch_prefix(self, prefix: str) -> Watch:
        if not self._watches:
            self._view = self._scan()
            self._tasks.append(asyncio.ensure_future(self._poll_loop()))
        watch = Watch(prefix, on_close=self._remove_watch)
        for key, value in sorted(self._view.items()):
            if key.startswith(prefix):
                watch.push(WatchEvent(PUT, key, value))
        self._watches.append(watch)
        return watch

    def _remove_watch(self, watch: Watch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)

    # -- internals ---------------------------------------------------------------
    def _key_path(self, key: str) -> Path:
        return self.root / "keys" / _file_name(key)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = self.root / "tmp" / f"{os.getpid()}-{random.getrandbits(48):x}"
        tmp.write_bytes(data)
        os.replace(tmp, path)

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _write_lease(self) -> None:
        path = self.root / "leases" / self._lease_hex
        self._atomic_write(path, str(self.ttl).encode())

    async def _keepalive(self) -> None:
        path = self.root / "leases" / self._lease_hex
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                os.utime(path)
            except FileNotFoundError:
                log.warning("file discovery: lease %s vanished; re-registering", self._lease_hex)
                self._write_lease()
                for key, value in list(self._owned.items()):
                    await self.put(key, value)

    def _read(self, path: Path) -> _Entry | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.msgpack.decode(data, type=_Entry)
        except msgspec.DecodeError:
            log.warning("file discovery: ignoring corrupt entry %s", path.name)
            return None

    def _lease_ttl(self, lease: str) -> float:
        ttl = self._lease_ttl_cache.get(lease)
        if ttl is None:
            try:
                ttl = float((self.root / "leases" / lease).read_text() or self.ttl)
            except (FileNotFoundError, ValueError):
                return self.ttl
            self._lease_ttl_cache[lease] = ttl
        return ttl

    def _alive(self, lease: str, now: float) -> bool:
        if not lease or lease == self._lease_hex:
            return True
        try:
            mtime = os.stat(self.root / "leases" / lease).st_mtime
        except FileNotFoundError:
            return False
        return now - mtime < self._lease_ttl(lease)

    def _scan(self) -> dict[str, bytes]:
        """Current live view; collects keys of expired leases on the way."""
        now = time.time()
        live: dict[str, bytes] = {}
        seen: set[str] = set()
        alive_cache: dict[str, bool] = {}
        with os.scandir(self.root / "keys") as it:
            for de in it:
                seen.add(de.name)
                entry = self._cached_entry(de)
                if entry is None:
                    continue
                alive = alive_cache.get(entry.lease)
                if alive is None:
                    alive = alive_cache[entry.lease] = self._alive(entry.lease, now)
                if alive:
                    live[entry.key] = entry.value
                else:
                    self._collect(de.path, entry.lease)
        for name in set(self._file_cache) - seen:
            del self._file_cache[name]
        return live

    def _cached_entry(self, de: os.DirEntry) -> _Entry | None:
        try:
            st = de.stat()
        except FileNotFoundError:
            return None
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._file_cache.get(de.name)
        if cached is not None and cached[0] == version:
            return cached[1]
        entry = self._read(Path(de.path))
        self._file_cache[de.name] = (version, entry)
        return entry

    def _collect(self, key_path: str, lease: str) -> None:
        self._unlink(Path(key_path))
        self._unlink(self.root / "leases" / lease)
        self._lease_ttl_cache.pop(lease, None)

    async def _poll_loop(self) -> None:
        while not self._closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            if not self._watches:
                continue
            try:
                self._diff(self._scan())
            except OSError as exc:
                log.warning("file discovery poll failed: %s", exc)

    def _diff(self, new: dict[str, bytes]) -> None:
        old = self._view
        self._view = new
        events = [WatchEvent(DELETE, k) for k in old.keys() - new.keys()]
        events += [WatchEvent(PUT, k, v) for k, v in new.items() if old.get(k) != v]
        for event in events:
            for w in self._watches:
                if event.key.startswith(w.prefix):
                    w.push(event)
