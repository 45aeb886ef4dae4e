"""A small data centre on one machine: hosts as network namespaces on a bridge, for cluster tests.

    with Cluster(["infra", "front", "w1", "w2", "client"]) as c:
        etcd, nats = c.infra("infra")                    # real etcd + nats-server on infra's address
        c.start("w1", "worker", "--engine", "mocker", ...)  # cluster env, w1's address
        c.partition("w1", "infra"); c.heal("w1", "infra")
        c.shape("w1", "w2", rate="10gbit")               # htb; latency/loss need netem
        c.kill_host("w1"); print(c.logs("w1"))
        c.call("client", lambda: asyncio.run(main()))    # a client whose sockets live on `client`

Each host has one address in a private /24 chosen per rig (10.213.N.0/24), reachable
only from the rig's own namespaces. Processes get only the cluster settings a user
would set on a real machine: etcd discovery, the NATS event plane, and the host's
own address to advertise and bind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from kvflow.testing import netns
from kvflow.testing.procs import Proc, runtime_env
from kvflow.testing.servers import EtcdServer, NatsServer

T = TypeVar("T")
RIG_PREFIX = "kvf"


class ShapingUnavailable(RuntimeError):
    """The kernel lacks the queueing discipline a shaping request needs (e.g. netem)."""


class Host:
    """One namespace with one address; the processes started on it and their logs."""

    def __init__(self, name: str, ns: str, addr: str, log_dir: Path) -> None:
        self.name, self.ns, self.addr = name, ns, addr
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def kvflow(self, *args: str, env: Mapping[str, str], name: str = "kvflow") -> Proc:
        """`python -m kvflow.cli.main ARGS` inside this host's namespace."""
        argv = [*netns.exec_prefix(self.ns), sys.executable, "-m", "kvflow.cli.main", *args]
        n = len(list(self.log_dir.glob(f"{name}-*.log")))
        proc = Proc(argv, env, self.log_dir / f"{name}-{n}.log")
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        """SIGKILL every process in the namespace, like pulling the host's power."""
        for pid in netns.pids(self.ns):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.popen.wait(10)

    def logs(self) -> str:
        parts = [f"--- {p.name} ---\n{p.read_text(errors='replace')[-6000:]}"
                 for p in sorted(self.log_dir.glob("*.log"))]
        return "\n".join(parts) or "(no logs)"


def _in_ns(ns: str) -> Callable[[list[str]], list[str]]:
    return lambda cmd: netns.exec_prefix(ns) + cmd


class NsEtcd(EtcdServer):
    """etcd on a rig host's address, started inside that host's namespace."""

    def __init__(self, host: Host) -> None:
        self.host = host.addr  # type: ignore[misc]
        self._ns = host.ns
        super().__init__()
        self.client_port, self.peer_port = 2379, 2380

    def command(self) -> list[str]:
        return _in_ns(self._ns)(super().command())

    def is_ready(self) -> bool:
        return netns.call_in(self._ns, super().is_ready, timeout=5)


class NsNats(NatsServer):
    """nats-server on a rig host's address, started inside that host's namespace."""

    def __init__(self, host: Host) -> None:
        self.host = host.addr  # type: ignore[misc]
        self._ns = host.ns
        super().__init__()
        self.port = 4222

    def command(self) -> list[str]:
        return _in_ns(self._ns)(super().command())

    def is_ready(self) -> bool:
        return netns.call_in(self._ns, super().is_ready, timeout=5)


class Cluster:
    """K hosts on one bridge. Everything is removed on close(), also after a failure."""

    def __init__(self, names: Iterable[str], *, lease_ttl: float = 2.0) -> None:
        reason = netns.unavailable_reason()
        if reason is not None:
            raise netns.NetnsUnavailable(reason)
        self.tag = RIG_PREFIX + secrets.token_hex(2)
        self.subnet = f"10.213.{secrets.randbelow(250) + 1}"
        self.lease_ttl = lease_ttl
        self.namespace = "cl" + secrets.token_hex(3)
        self.base_dir = Path(tempfile.mkdtemp(prefix="kvflow-cluster-"))
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self.servers: list[EtcdServer | NatsServer] = []
        self._cuts: set[tuple[str, str]] = set()
        try:
            self._build(list(names))
        except BaseException:
            self.close()
            raise

    # -- building -------------------------------------------------------------------
    def _build(self, names: list[str]) -> None:
        netns.add(self.switch)
        netns.sh(*netns.exec_prefix(self.switch), "ip", "link", "add", "br0", "type", "bridge")
        netns.sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            self._add_host(name, f"{self.subnet}.{10 + i}", i)

    def _add_host(self, name: str, addr: str, index: int) -> None:
        ns = f"{self.tag}-{name}"[:15]
        netns.add(ns)
        port = f"p{index}"
        netns.veth(ns, "eth0", self.switch, port)
        netns.sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        netns.sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        netns.sh("ip", "-n", ns, "link", "set", "eth0", "up")
        log_dir = self.base_dir / name
        log_dir.mkdir()
        self.hosts[name] = Host(name, ns, addr, log_dir)

    # -- services -------------------------------------------------------------------
    def infra(self, host: str) -> tuple[EtcdServer, NatsServer]:
        """Real etcd and nats-server on `host`, on their standard ports."""
        etcd, nats = NsEtcd(self.hosts[host]), NsNats(self.hosts[host])
        self.servers += [etcd, nats]
        etcd.start()
        nats.start()
        self._etcd, self._nats = etcd, nats
        return etcd, nats

    def env(self, host: str, **settings: object) -> dict[str, str]:
        """The environment a user sets on `host`: etcd, NATS, its own address."""
        h = self.hosts[host]
        base: dict[str, object] = {
            "discovery": "etcd", "etcd_endpoints": self._etcd.endpoints,
            "event_plane": "nats", "nats_url": self._nats.url,
            "advertise_host": h.addr, "system_host": h.addr,
            "namespace": self.namespace, "lease_ttl": self.lease_ttl,
        }
        return runtime_env(**{**base, **settings})

    def start(self, host: str, *args: str, name: str = "kvflow", **settings: object) -> Proc:
        """`kvflow ARGS` on `host` with the cluster environment."""
        return self.hosts[host].kvflow(*args, env=self.env(host, **settings), name=name)

    def call(self, host: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run `fn` with its sockets on `host` (see netns.call_in)."""
        return netns.call_in(self.hosts[host].ns, fn, timeout)

    # -- faults ---------------------------------------------------------------------
    def kill_host(self, host: str) -> None:
        self.hosts[host].kill_all()

    def partition(self, a: str, b: str) -> None:
        """Silently drop every packet between hosts a and b (both directions)."""
        for x, y in ((a, b), (b, a)):
            self._cut(self.hosts[x], self.hosts[y])
        self._cuts.add((a, b))

    def heal(self, a: str, b: str) -> None:
        for x, y in ((a, b), (b, a)):
            self._uncut(self.hosts[x], self.hosts[y])
        self._cuts.discard((a, b))

    def _cut(self, at: Host, peer: Host) -> None:
        if not netns.have_nft():
            netns.sh("ip", "-n", at.ns, "route", "add", "blackhole", f"{peer.addr}/32")
            return
        table = f"cut_{peer.name}"
        netns.nft(at.ns, "add", "table", "inet", table)
        for chain, hook, field in (("in", "input", "saddr"), ("out", "output", "daddr")):
            netns.nft(at.ns, "add", "chain", "inet", table, chain,
                      f"{{ type filter hook {hook} priority 0 ; }}")
            netns.nft(at.ns, "add", "rule", "inet", table, chain, "ip", field, peer.addr, "drop")

    def _uncut(self, at: Host, peer: Host) -> None:
        if not netns.have_nft():
            netns.sh("ip", "-n", at.ns, "route", "del", "blackhole", f"{peer.addr}/32", check=False)
            return
        netns.nft(at.ns, "delete", "table", "inet", f"cut_{peer.name}")

    def shape(self, a: str, b: str, *, rate: str = "", delay: str = "", loss: str = "") -> None:
        """Shape traffic from a to b (call twice for both ways): htb rate; netem delay/loss."""
        src, dst = self.hosts[a], self.hosts[b]
        tc = [*netns.exec_prefix(src.ns), "tc"]
        index = list(self.hosts).index(b) + 10
        have_root = "htb" in netns.sh(*tc, "qdisc", "show", "dev", "eth0").stdout
        if not have_root:
            netns.sh(*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1")
            netns.sh(*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1",
                     "htb", "rate", "100gbit")
        netns.sh(*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", f"1:{index}",
                 "htb", "rate", rate or "100gbit")
        if delay or loss:
            netem = [*tc, "qdisc", "add", "dev", "eth0", "parent", f"1:{index}", "netem"]
            netem += (["delay", delay] if delay else []) + (["loss", loss] if loss else [])
            done = netns.sh(*netem, check=False)
            if done.returncode != 0:
                raise ShapingUnavailable(f"netem is not available in this kernel: {done.stderr.strip()}")
        netns.sh(*tc, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1",
                 "u32", "match", "ip", "dst", f"{dst.addr}/32", "flowid", f"1:{index}")

    # -- reading and cleanup --------------------------------------------------------
    def logs(self, host: str | None = None) -> str:
        names = [host] if host else list(self.hosts)
        return "\n".join(f"===== host {n} ({self.hosts[n].addr}) =====\n{self.hosts[n].logs()}"
                         for n in names)

    def wait(self, what: Callable[[], bool], timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise TimeoutError(message)
            time.sleep(0.1)

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in host.procs:
                proc.stop()
        for server in self.servers:
            server.close()
        for host in self.hosts.values():
            netns.delete(host.ns)
        netns.delete(self.switch)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
