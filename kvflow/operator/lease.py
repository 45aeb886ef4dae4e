"""One active operator replica: leader election on a coordination.k8s.io/v1 Lease.

`lease_step` is the pure decision (create, renew, take over an expired lease,
or wait); `LeaseHolder` runs it against the API with optimistic concurrency
(a PUT carries the resourceVersion it read, so two candidates cannot both win).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from kvflow.runtime.kube import ApiRequest, KubeApiError, KubeClient, resource_path

log = logging.getLogger(__name__)
LEASE_API = "coordination.k8s.io/v1"


@dataclass(frozen=True)
class LeaseStep:
    action: str  # "create" | "renew" | "take" | "wait"
    request: ApiRequest | None  # None for "wait"


def _stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(stamp: str | None) -> dt.datetime | None:
    if not stamp:
        return None
    return dt.datetime.strptime(stamp.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")


def lease_step(lease: dict[str, Any] | None, *, namespace: str, name: str, me: str,
               duration_s: int, now: dt.datetime) -> LeaseStep:
    """What a candidate named `me` does next, given the Lease as read (None: there is none)."""
    stamp = _stamp(now)
    if lease is None:
        spec = {"holderIdentity": me, "leaseDurationSeconds": duration_s, "acquireTime": stamp,
                "renewTime": stamp, "leaseTransitions": 0}
        body = {"apiVersion": LEASE_API, "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        return LeaseStep("create", ApiRequest("POST", resource_path(LEASE_API, "Lease", namespace), body))
    spec = dict(lease.get("spec") or {})
    if spec.get("holderIdentity") == me:
        action = "renew"
        spec["renewTime"] = stamp
    else:
        renewed = _parse(spec.get("renewTime"))
        held_for = dt.timedelta(seconds=int(spec.get("leaseDurationSeconds") or duration_s))
        if spec.get("holderIdentity") and renewed is not None and renewed + held_for > now:
            return LeaseStep("wait", None)
        action = "take"
        spec.update(holderIdentity=me, leaseDurationSeconds=duration_s, acquireTime=stamp,
                    renewTime=stamp, leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1)
    body = {**lease, "spec": spec}  # metadata keeps resourceVersion: a raced PUT gets 409
    return LeaseStep(action, ApiRequest("PUT", resource_path(LEASE_API, "Lease", namespace, name), body))


class LeaseHolder:
    """Acquire the Lease, keep renewing it, and say when it is lost."""

    def __init__(self, client: KubeClient, namespace: str, name: str, me: str, duration_s: int = 15) -> None:
        self.client, self.namespace, self.name, self.me = client, namespace, name, me
        self.duration_s = duration_s
        self.leading = asyncio.Event()

    async def attempt(self) -> str:
        """One round: the action taken ("create", "renew", "take"), "wait", or "conflict"."""
        path = resource_path(LEASE_API, "Lease", self.namespace, self.name)
        try:
            lease = await self.client.send(ApiRequest("GET", path))
        except KubeApiError as exc:
            if exc.status != 404:
                raise
            lease = None
        step = lease_step(lease, namespace=self.namespace, name=self.name, me=self.me,
                          duration_s=self.duration_s, now=dt.datetime.now(dt.timezone.utc))
        if step.request is None:
            return step.action
        try:
            await self.client.send(step.request)
        except KubeApiError as exc:
            if exc.status == 409:  # another candidate wrote first
                return "conflict"
            raise
        return step.action

    async def run(self) -> None:
        """Returns when leadership, once held, could not be renewed within the lease duration."""
        last_ok = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                action = await self.attempt()
            except (KubeApiError, OSError) as exc:
                log.warning("lease %s: %s", self.name, exc)
                action = "error"
            if self.leading.is_set() and action == "wait":
                log.error("lease %s: another operator holds it now", self.name)
                return
            if action in ("create", "renew", "take"):
                last_ok = loop.time()
                if not self.leading.is_set():
                    log.info("lease %s: %s is the active operator", self.name, self.me)
                    self.leading.set()
            elif self.leading.is_set() and last_ok is not None and loop.time() - last_ok > self.duration_s:
                log.error("lease %s: lost leadership", self.name)
                return
            await asyncio.sleep(self.duration_s / 3)
