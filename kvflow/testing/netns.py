"""Linux network namespaces for the cluster rig: create, run in, shape, cut and remove (needs root).

Every name this module makes carries a per-rig prefix, so two rigs (or a leftover
from a killed run) never collide, and `remove_stale()` can sweep what a killed run
left behind. Nothing here touches the root namespace's links, routes or firewall:
hosts talk only over a bridge that lives in a namespace of its own.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(RuntimeError):
    """This machine cannot make network namespaces (not root, no `ip`, or the kernel refuses)."""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one iproute2/nft command; on failure raise with its stderr."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (the cluster tests run as root in CI)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"kvfprobe{os.getpid()}"
    made = sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


def add(ns: str) -> None:
    sh("ip", "netns", "add", ns)
    sh("ip", "-n", ns, "link", "set", "lo", "up")


def delete(ns: str) -> None:
    """Remove a namespace and everything in it; a namespace that is gone is fine."""
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    sh("ip", "netns", "del", ns, check=False)


def remove_stale(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with `prefix` (left by a killed run)."""
    gone = [p.name for p in NETNS_DIR.glob(prefix + "*")] if NETNS_DIR.exists() else []
    for ns in gone:
        delete(ns)
    return gone


def pids(ns: str) -> list[int]:
    return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]


def exec_prefix(ns: str) -> list[str]:
    """Command prefix that runs a program inside `ns` (iproute2 execs it: same pid)."""
    return ["ip", "netns", "exec", ns]


def _enter(ns: str) -> None:
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(ns: str, fn: Callable[[], T], timeout: float | None = None) -> T:
    """Run `fn()` on a fresh thread that has joined `ns`: every socket it opens lives there.

    The namespace of one thread changes, never the process's; the thread exits after.
    `fn` may run a whole event loop (`lambda: asyncio.run(main())`).
    """
    box: dict[str, object] = {}

    def run() -> None:
        try:
            _enter(ns)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"call in namespace {ns} still running after {timeout}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def veth(host_ns: str, host_if: str, switch_ns: str, switch_if: str) -> None:
    """A cable: `host_if` in the host's namespace, its other end in the switch's."""
    sh("ip", "link", "add", host_if, "netns", host_ns, "type", "veth",
       "peer", "name", switch_if, "netns", switch_ns)


def nft(ns: str, *rule: str) -> None:
    sh(*exec_prefix(ns), "nft", *rule)


def have_nft() -> bool:
    return shutil.which("nft") is not None
