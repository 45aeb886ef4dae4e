"""The kopf handlers: every event on a KvflowDeployment (or its pools' replicas) runs one reconcile.

The handlers only fetch and call `apply.reconcile_once`, which calls the pure
`reconcile.desired_state`. They live in their own registry (no global kopf
state); `run_operator` starts kopf with it once this replica holds the Lease.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import kopf

from kvflow.operator.apply import reconcile_once
from kvflow.operator.lease import LeaseHolder
from kvflow.operator.spec import GROUP, KIND, VERSION
from kvflow.runtime.kube import ApiRequest, KubeApiError, KubeClient, KubeConfig, resource_path

log = logging.getLogger(__name__)
registry = kopf.OperatorRegistry()
STATUS_INTERVAL_S = 10.0  # how often readiness is re-read while nothing changes


@dataclass
class Memo:
    """What every handler receives as `memo`: the API connection."""

    config: KubeConfig
    client: KubeClient | None = None


def connection_info(config: KubeConfig) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=config.server, token=config.token or None,
                               scheme="Bearer" if config.token else None, ca_path=config.ca_file or None)


@kopf.on.login(registry=registry)
def login(memo: Memo, **_: Any) -> kopf.ConnectionInfo:
    return connection_info(memo.config)


@kopf.on.startup(registry=registry)
async def configure(settings: kopf.OperatorSettings, memo: Memo, **_: Any) -> None:
    # Our status has a schema; kopf keeps its own bookkeeping in annotations instead.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    memo.client = KubeClient(memo.config)


@kopf.on.cleanup(registry=registry)
async def close(memo: Memo, **_: Any) -> None:
    if memo.client is not None:
        await memo.client.close()


@kopf.on.create(GROUP, VERSION, "kvflowdeployments", registry=registry)
@kopf.on.update(GROUP, VERSION, "kvflowdeployments", registry=registry)
@kopf.on.resume(GROUP, VERSION, "kvflowdeployments", registry=registry)
async def on_change(body: kopf.Body, memo: Memo, **_: Any) -> None:
    """Spec changed (or the operator restarted): converge now."""
    await _reconcile(memo, dict(body))


@kopf.timer(GROUP, VERSION, "kvflowdeployments", interval=STATUS_INTERVAL_S, registry=registry)
async def refresh(body: kopf.Body, memo: Memo, **_: Any) -> None:
    """Pods come and go without touching the CR: re-read readiness, re-apply (a no-op when unchanged)."""
    await _reconcile(memo, dict(body))


@kopf.on.field(GROUP, VERSION, "kvflowpools", field="spec.replicas", registry=registry)
async def on_pool_scaled(body: kopf.Body, memo: Memo, **_: Any) -> None:
    """The planner / an HPA / kubectl scaled a pool: resize its Deployment now."""
    owner = next((o for o in body.metadata.get("ownerReferences", []) if o.get("kind") == KIND), None)
    if owner is None:
        return
    path = resource_path(f"{GROUP}/{VERSION}", "kvflowdeployments", body.metadata.namespace, owner["name"])
    assert memo.client is not None
    parent = await memo.client.send(ApiRequest("GET", path))
    await _reconcile(memo, parent)


async def _reconcile(memo: Memo, body: dict[str, Any]) -> None:
    assert memo.client is not None, "the startup handler makes the client"
    try:
        await reconcile_once(memo.client, body)
    except KubeApiError as exc:
        raise kopf.TemporaryError(str(exc), delay=5) from exc


async def run_operator(config: KubeConfig, *, namespaces: tuple[str, ...], lease_namespace: str,
                       lease_name: str, identity: str, lease_duration_s: int = 15) -> int:
    """Wait for the Lease, run kopf while it is held; returns 1 when leadership is lost."""
    client = KubeClient(config)
    holder = LeaseHolder(client, lease_namespace, lease_name, identity, lease_duration_s)
    keeper = asyncio.create_task(holder.run())
    try:
        await _first(holder.leading.wait(), keeper)
        if keeper.done():
            return 1
        stop = asyncio.Event()
        operator = asyncio.create_task(kopf.operator(
            registry=registry, memo=Memo(config), standalone=True, stop_flag=stop,
            clusterwide=not namespaces, namespaces=namespaces))
        await _first(keeper, operator)
        stop.set()
        await asyncio.gather(operator, return_exceptions=True)
        return 1 if keeper.done() else 0
    finally:
        keeper.cancel()
        await client.close()


async def _first(*aws: Any) -> None:
    """Wait until one finishes; coroutines passed in (not tasks) are cancelled if still pending."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task, original in zip(tasks, aws, strict=True):
        if task in pending and not isinstance(original, asyncio.Future):
            task.cancel()
