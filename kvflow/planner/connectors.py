"""How the planner acts, registered by name: `virtual` (records), `local` (worker processes), `kubernetes`.

The local connector starts `kvflow worker` processes on this machine through
kvflow.runtime.launcher (as `kvflow run` does) with the given worker arguments (plus
`--role` for disaggregated pools) and removes one with
SIGTERM: the worker leaves discovery first, so no new request reaches it, finishes
the streams it has, and exits — no request is lost. A worker that died by itself
no longer counts, so the planner sees the difference and reconciles.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kvflow.planner.model import Fleet
from kvflow.runtime import launcher

log = logging.getLogger(__name__)
ROLES = ("aggregated", "prefill", "decode")


class Connector(Protocol):
    def current(self) -> Fleet: ...

    def apply(self, target: Fleet) -> None: ...

    def close(self) -> None: ...


_CONNECTORS: dict[str, Callable[..., Connector]] = {}


def register_connector(name: str) -> Callable[[Callable[..., Connector]], Callable[..., Connector]]:
    def add(factory: Callable[..., Connector]) -> Callable[..., Connector]:
        _CONNECTORS[name] = factory
        return factory
    return add


def connector_names() -> tuple[str, ...]:
    return tuple(_CONNECTORS)


def make_connector(name: str, **kwargs: object) -> Connector:
    if name not in _CONNECTORS:
        raise ValueError(f"unknown planner connector {name!r}; use one of {', '.join(_CONNECTORS)}")
    return _CONNECTORS[name](**kwargs)


def _counts(fleet: Fleet) -> dict[str, int]:
    return {"aggregated": fleet.aggregated, "prefill": fleet.prefill, "decode": fleet.decode}


@register_connector("virtual")
@dataclass
class VirtualConnector:
    """Changes nothing real: remembers the last target (simulation, advisory tests)."""

    fleet: Fleet = field(default_factory=Fleet)
    applied: list[Fleet] = field(default_factory=list)

    def current(self) -> Fleet:
        return self.fleet

    def apply(self, target: Fleet) -> None:
        self.fleet = target
        self.applied.append(target)

    def close(self) -> None:
        pass


@register_connector("local")
class LocalConnector:
    """`kvflow worker WORKER_ARGS [--role R]` processes, started and drained on this machine."""

    def __init__(self, worker_args: str = "", env: dict[str, str] | None = None,
                 log_dir: str = "", drain_timeout_s: float = 60.0) -> None:
        if not worker_args.strip():
            raise ValueError("the local connector needs --worker-args, e.g. "
                             "--worker-args '--engine mocker --model-path DIR'")
        self.argv = shlex.split(worker_args)
        self.env = dict(os.environ if env is None else env)
        self.log_dir = log_dir
        self.drain_timeout_s = drain_timeout_s
        self.procs: dict[str, list[subprocess.Popen]] = {r: [] for r in ROLES}
        self.draining: list[subprocess.Popen] = []
        self._n = 0

    def current(self) -> Fleet:
        self._reap()
        return Fleet(*(len(self.procs[r]) for r in ROLES))

    def apply(self, target: Fleet) -> None:
        self._reap()
        for role, want in _counts(target).items():
            live = self.procs[role]
            while len(live) < want:
                live.append(self._start(role))
            while len(live) > want:
                self._drain(live.pop())

    def _start(self, role: str) -> subprocess.Popen:
        args = [*self.argv, *(["--role", role] if role != "aggregated" else [])]
        self._n += 1
        log_path = os.path.join(self.log_dir, f"worker-{role}-{self._n}.log") if self.log_dir else None
        # Its own session and no death signal: a planner that crashes leaves the fleet serving.
        proc = launcher.launch("worker", args, self.env, log_path=log_path, die_with_parent=False,
                               new_session=True)
        log.info("planner: started %s worker pid %d", role, proc.pid)
        return proc

    def _drain(self, proc: subprocess.Popen) -> None:
        log.info("planner: draining worker pid %d (SIGTERM: finish streams, then exit)", proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        self.draining.append(proc)

    def _reap(self) -> None:
        for role, live in self.procs.items():
            for proc in [p for p in live if p.poll() is not None]:
                log.warning("planner: %s worker pid %d exited by itself (code %s)",
                            role, proc.pid, proc.returncode)
                live.remove(proc)
        self.draining = [p for p in self.draining if p.poll() is None]

    def close(self) -> None:
        launcher.stop([p for live in self.procs.values() for p in live] + self.draining,
                      self.drain_timeout_s)


@register_connector("kubernetes")
class KubernetesConnector:
    """Sets pool replicas through each pool's scale subresource (kvflow.planner.kubernetes).

    `targets` maps roles to scale targets, `role=<plural>.<group>/<name>` comma-separated,
    as the operator writes them; a role with several pools has its count split between
    them. Each call runs on the planner's worker thread with its own event loop.
    """

    def __init__(self, targets: str = "", namespace: str = "default", api_server: str = "") -> None:
        from kvflow.planner.kubernetes import ScaleTarget

        self.targets: dict[str, list[ScaleTarget]] = {r: [] for r in ROLES}
        for pair in filter(None, targets.split(",")):
            role, _, target = pair.partition("=")
            if role not in self.targets or not target:
                raise ValueError(f"--k8s-scale-targets entry {pair!r}: write ROLE=<plural>.<group>/<name> "
                                 f"with ROLE one of {', '.join(ROLES)}")
            self.targets[role].append(ScaleTarget.parse(target, namespace))
        if not any(self.targets.values()):
            raise ValueError("the kubernetes connector needs --k8s-scale-targets "
                             "(e.g. aggregated=kvflowpools.kvflow.dev/demo-worker)")
        self.api_server = api_server

    def _client(self):  # type: ignore[no-untyped-def]
        from kvflow.runtime.kube import KubeClient, KubeConfig

        config = KubeConfig(self.api_server) if self.api_server else KubeConfig.in_cluster()
        return KubeClient(config)

    def current(self) -> Fleet:
        from kvflow.planner.kubernetes import get_replicas

        async def read() -> Fleet:
            client = self._client()
            try:
                counts = [sum([(await get_replicas(client, t))[0] for t in self.targets[r]])
                          for r in ROLES]
            finally:
                await client.close()
            return Fleet(*counts)
        return asyncio.run(read())

    def apply(self, target: Fleet) -> None:
        from kvflow.planner.kubernetes import set_replicas

        async def write() -> None:
            client = self._client()
            try:
                for role, count in _counts(target).items():
                    pools = self.targets[role]
                    if count and not pools:
                        raise ValueError(f"the planner wants {count} {role} workers but no "
                                         f"{role} pool is given in --k8s-scale-targets")
                    for i, pool in enumerate(pools):
                        share = count // len(pools) + (1 if i < count % len(pools) else 0)
                        await set_replicas(client, pool, share)
            finally:
                await client.close()
        asyncio.run(write())

    def close(self) -> None:
        pass
