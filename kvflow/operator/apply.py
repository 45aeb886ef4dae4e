"""One reconcile against the API: read what exists, call the pure step, server-side apply, write status.

Idempotent: applying the same desired objects again changes nothing on the
server (server-side apply compares field by field), and a second run with the
same observed state sends the same requests.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from kvflow.operator import reconcile as r
from kvflow.operator import status as st
from kvflow.operator.objects import LABEL_INSTANCE, LABEL_NAME, Obj, selector_labels
from kvflow.operator.objects import Owner as _Owner
from kvflow.operator.spec import API_VERSION, Resource, SpecError, parse_resource
from kvflow.runtime.kube import KubeClient, apply_request, list_request, status_patch_request


def now_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def read_observed(client: KubeClient, resource: Resource) -> r.Observed:
    selector = {LABEL_NAME: "kvflow", LABEL_INSTANCE: resource.name}
    ns = resource.namespace
    pools = await client.send(list_request(API_VERSION, "KvflowPool", ns, selector))
    workloads: list[Any] = []
    for kind in ("Deployment", "StatefulSet"):
        listed = await client.send(list_request("apps/v1", kind, ns, selector))
        workloads += [{**x, "kind": kind} for x in listed.get("items", [])]
    return r.observe(pools.get("items", []), workloads)


async def apply_desired(client: KubeClient, desired: r.Desired) -> None:
    for obj in desired.objects:
        await client.send(apply_request(obj, r.FIELD_MANAGER))
    for seed in desired.seeds:
        await client.send(apply_request(seed, r.SEED_MANAGER))


async def write_pool_status(client: KubeClient, resource: Resource, desired: r.Desired,
                            observed: r.Observed) -> None:
    owner = _Owner(resource)
    for obj in desired.objects:
        if obj["kind"] != "KvflowPool":
            continue
        pool = obj["metadata"]["labels"]["kvflow.dev/pool"]
        deployment = observed.workloads.get(f"Deployment/{obj['metadata']['name']}")
        status = st.pool_status(selector_labels(owner, "worker", pool), deployment)
        await client.send(status_patch_request(obj, status))


async def reconcile_once(client: KubeClient, body: Obj) -> Obj:
    """Reconcile one KvflowDeployment; returns the status written to it."""
    old_status = body.get("status")
    try:
        resource = parse_resource(body)
    except SpecError as exc:
        status = {"error": str(exc), "conditions": [_invalid(exc, body)]}
        await client.send(status_patch_request(body, status))
        return status
    observed = await read_observed(client, resource)
    desired = r.desired_state(resource, observed)
    await apply_desired(client, desired)
    await write_pool_status(client, resource, desired, observed)
    status = st.deployment_status(resource.generation, desired, observed, now_stamp())
    status = st.keep_transition_time(status, old_status)
    status["error"] = ""
    await client.send(status_patch_request(body, status))
    return status


def _invalid(exc: SpecError, body: Obj) -> Obj:
    return {"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": str(exc),
            "observedGeneration": int(body.get("metadata", {}).get("generation") or 0),
            "lastTransitionTime": now_stamp()}
