"""Host memory other processes of this host can map: named files in /dev/shm, mmapped.

A worker that serves its KV to peers on the same host allocates its KV memory here once
(`SharedRegion.create`); a peer maps it read-only by name (`SharedRegion.attach`) and
copies blocks straight out of it. Names are unique per process and allocation
(`kvflow-kv-<pid>-<random>`); the creator unlinks its file on close, and `create` first
removes files left by kvflow processes that no longer exist (a crashed worker).
We use plain files + mmap rather than multiprocessing.shared_memory, whose resource
tracker (Python < 3.13) would unlink a segment when any attaching process exits.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "kvflow-kv-"


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class SharedRegion:
    """One mmapped /dev/shm file: `view` is its bytes (writable for the creator, or when
    attached `writable`)."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self._mmap = mm
        self.owner = owner
        self.view = memoryview(mm)

    @property
    def nbytes(self) -> int:
        return self.view.nbytes

    @classmethod
    def create(cls, nbytes: int) -> SharedRegion:
        sweep_stale()
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, max(nbytes, 1))
            mm = mmap.mmap(fd, max(nbytes, 1))
        finally:
            os.close(fd)
        return cls(name, mm, owner=True)

    @classmethod
    def attach(cls, name: str, writable: bool = False) -> SharedRegion:
        """Map another process's region: read-only, or `writable` (a tensor-parallel engine's
        rank 0 writing pulled KV into its other ranks' regions)."""
        if not name.startswith(PREFIX) or "/" in name:
            raise ValueError(f"not a kvflow shared KV region name: {name!r}")
        fd = os.open(SHM_DIR / name, os.O_RDWR if writable else os.O_RDONLY)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, 0, prot=prot)
        finally:
            os.close(fd)
        return cls(name, mm, owner=False)

    def close(self) -> None:
        """Unmap (best effort while buffers still point in) and, for the creator, unlink."""
        self.view.release()
        with contextlib.suppress(BufferError):
            self._mmap.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                (SHM_DIR / self.name).unlink()


def sweep_stale() -> int:
    """Remove region files whose creating process is gone; how many were removed."""
    removed = 0
    for path in SHM_DIR.glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
