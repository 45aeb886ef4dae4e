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
from kvflow.runtime.kube import (
    KubeApiError,
    KubeClient,
    apply_request,
    delete_request,
    list_request,
    status_patch_request,
)


def now_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


OWNED_KINDS = [("v1", "ConfigMap"), ("v1", "Service"), ("v1", "ServiceAccount"),
               ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
               ("apps/v1", "Deployment"), ("apps/v1", "StatefulSet")]


async def read_observed(client: KubeClient, resource: Resource) -> r.Observed:
    """Every object labelled with this instance, of every kind the operator makes."""
    selector = {LABEL_NAME: "kvflow", LABEL_INSTANCE: resource.name}
    ns = resource.namespace
    pools = await client.send(list_request(API_VERSION, "KvflowPool", ns, selector))
    objects: list[Any] = []
    for api_version, kind in OWNED_KINDS:
        listed = await client.send(list_request(api_version, kind, ns, selector))
        objects += [{**x, "apiVersion": api_version, "kind": kind} for x in listed.get("items", [])]
    pools_listed = [{**x, "apiVersion": API_VERSION, "kind": "KvflowPool"} for x in pools.get("items", [])]
    return r.observe(pools_listed, objects)


async def delete_stale(client: KubeClient, resource: Resource, desired: r.Desired,
                       observed: r.Observed) -> None:
    for obj in r.stale(resource, desired, observed):
        try:
            await client.send(delete_request(obj))
        except KubeApiError as exc:
            if exc.status != 404:  # already gone is fine
                raise


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
        deployment = observed.objects.get(f"Deployment/{obj['metadata']['name']}")
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
    await delete_stale(client, resource, desired, observed)
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
