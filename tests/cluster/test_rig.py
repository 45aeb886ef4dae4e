"""The rig itself: hosts reach each other, shaping limits bandwidth, partitions cut and heal, cleanup."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from kvflow.testing import netns
from kvflow.testing.cluster import Cluster, ShapingUnavailable

pytestmark = pytest.mark.cluster
PORT = 7000


@pytest.fixture
def pair():
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with Cluster(["a", "b"]) as cluster:
        yield cluster


def _serve_sink(cluster: Cluster, ready: threading.Event, received: list[int],
                done_at: list[float]) -> None:
    def run() -> None:
        with socket.create_server((cluster.hosts["b"].addr, PORT)) as srv:
            srv.settimeout(20)
            ready.set()
            conn, _ = srv.accept()
            with conn:
                total = 0
                while chunk := conn.recv(1 << 16):
                    total += len(chunk)
                received.append(total)
                done_at.append(time.monotonic())
    cluster.call("b", run, timeout=30)


def _send(cluster: Cluster, nbytes: int, timeout: float = 5.0) -> float:
    """Seconds to push nbytes from a to b (connect included)."""
    def run() -> float:
        start = time.monotonic()
        with socket.create_connection((cluster.hosts["b"].addr, PORT), timeout=timeout) as sock:
            sock.sendall(b"x" * nbytes)
        return time.monotonic() - start
    return cluster.call("a", run, timeout=timeout + 30)


def _transfer(cluster: Cluster, nbytes: int) -> tuple[float, int]:
    """(seconds from the first send to the last byte received, bytes received)."""
    ready, received, done_at = threading.Event(), [], []
    sink = threading.Thread(target=_serve_sink, args=(cluster, ready, received, done_at))
    sink.start()
    ready.wait(10)
    started = time.monotonic()
    _send(cluster, nbytes)
    sink.join(30)
    return done_at[0] - started, received[0]


def test_hosts_reach_each_other_only_inside_the_rig(pair: Cluster) -> None:
    seconds, got = _transfer(pair, 1 << 20)
    assert got == 1 << 20
    assert pair.subnet.startswith("10.213.")
    assert all(h.addr.startswith(pair.subnet + ".") for h in pair.hosts.values())


def test_shaping_limits_bandwidth_between_two_hosts(pair: Cluster) -> None:
    pair.shape("a", "b", rate="40mbit")
    seconds, got = _transfer(pair, 2_500_000)  # 20 Mbit: about 0.5 s at 40 Mbit/s
    assert got == 2_500_000
    assert 0.3 < seconds < 3.0, seconds
    try:
        pair.shape("b", "a", delay="1ms")
    except ShapingUnavailable as exc:
        assert "netem" in str(exc)  # this kernel has no netem: said plainly, not ignored


def test_partition_drops_packets_and_heal_restores(pair: Cluster) -> None:
    pair.partition("a", "b")
    with pytest.raises(OSError):
        _send(pair, 10, timeout=1.0)
    pair.heal("a", "b")
    _, got = _transfer(pair, 1000)
    assert got == 1000


def test_everything_is_removed_also_when_the_test_fails() -> None:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="boom"), Cluster(["x"]) as cluster:
        names = [h.ns for h in cluster.hosts.values()] + [cluster.switch]
        raise RuntimeError("boom")
    left = {p.name for p in netns.NETNS_DIR.glob(cluster.tag + "*")}
    assert not left and not cluster.base_dir.exists() and names
