"""The reconcile step as a pure function: a KvflowDeployment (+ what is observed) → the desired objects.

No I/O here: the kopf handlers read the cluster, call `desired_state`, and
server-side apply what it returns; the plain-manifest generator calls it with
`owned=False` and nothing observed. Same input, same output, byte for byte.

Pool replicas: the CR's `pools[].replicas` seeds a KvflowPool (applied by a
separate field manager, SEED_MANAGER); after that, the KvflowPool's
`spec.replicas` — set through its scale subresource by the planner, an HPA or
`kubectl scale` — drives the pool's Deployment. Editing the CR's replicas
re-seeds the pool (the pool remembers the last seed in an annotation).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kvflow.operator import objects as o
from kvflow.operator import workloads as w
from kvflow.operator.infra import infra
from kvflow.operator.objects import Obj, Owner
from kvflow.operator.spec import API_VERSION, GROUP, POOL_KIND, Pool, Resource

FIELD_MANAGER = "kvflow-operator"
SEED_MANAGER = "kvflow-operator-seed"
SEEDED = "kvflow.dev/seeded-replicas"


@dataclass(frozen=True)
class ObservedPool:
    """A KvflowPool as it stands in the cluster."""

    replicas: int
    seeded: int | None  # the CR value last seeded, from the pool's annotation


@dataclass(frozen=True)
class Observed:
    """What the handlers read before reconciling; empty = nothing exists yet."""

    pools: Mapping[str, ObservedPool] = field(default_factory=dict)  # by KvflowPool name
    objects: Mapping[str, Obj] = field(default_factory=dict)  # "Kind/name" → owned object as read


@dataclass(frozen=True)
class Desired:
    objects: tuple[Obj, ...]  # applied with FIELD_MANAGER, in this order
    seeds: tuple[Obj, ...] = ()  # pool replica seeds, applied with SEED_MANAGER after objects
    pool_replicas: Mapping[str, int] = field(default_factory=dict)  # KvflowPool name → replicas


def observe(pools: list[Obj], objects: list[Obj]) -> Observed:
    """Raw objects listed from the API (pools, and every other kind the operator makes) → Observed."""
    seen = {}
    for pool in pools:
        raw = (pool["metadata"].get("annotations") or {}).get(SEEDED)
        seeded = int(raw) if raw is not None and raw.isdigit() else None
        seen[pool["metadata"]["name"]] = ObservedPool(int(pool["spec"].get("replicas", 0)), seeded)
    return Observed(pools=seen, objects={object_key(x): x for x in [*pools, *objects]})


def object_key(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def desired_state(resource: Resource, observed: Observed | None = None, *, owned: bool = True) -> Desired:
    """Everything one KvflowDeployment should be made of, in apply order."""
    observed = observed or Observed()
    owner = Owner(resource, managed_by="kvflow-operator" if owned else "kvflow-manifests", owned=owned)
    objects: list[Obj] = [w.runtime_config_map(owner), *infra(owner), *w.frontend(owner)]
    seeds: list[Obj] = []
    replicas: dict[str, int] = {}
    for pool in resource.spec.pools:
        name = w.component_name(owner, pool.pool_name)
        count = pool.replicas
        if owned:
            count, seed = _pool_replicas(owner, pool, observed.pools.get(name))
            objects.append(pool_resource(owner, pool))
            seeds += [seed] if seed else []
        replicas[name] = count
        objects.append(w.pool_deployment(owner, pool, count))
    if resource.spec.planner.enabled:
        targets = [scale_target(owner, w.component_name(owner, p.pool_name)) for p in resource.spec.pools]
        objects += w.planner(owner, targets, planner_rules(owner, list(replicas)))
    return Desired(tuple(objects), tuple(seeds), replicas)


def stale(resource: Resource, desired: Desired, observed: Observed) -> list[Obj]:
    """Objects this resource made that it no longer wants (a pool removed, the planner turned off)."""
    wanted = {object_key(o) for o in desired.objects}
    return [o for key, o in sorted(observed.objects.items()) if key not in wanted
            and any(ref.get("uid") == resource.uid for ref in o["metadata"].get("ownerReferences", []))]


def _pool_replicas(owner: Owner, pool: Pool, seen: ObservedPool | None) -> tuple[int, Obj | None]:
    """The pool's replicas now, and a seed to apply when the CR's value is new to the pool."""
    if seen is not None and seen.seeded == pool.replicas:
        return seen.replicas, None
    return pool.replicas, pool_seed(owner, pool)


def pool_resource(owner: Owner, pool: Pool) -> Obj:
    name = w.component_name(owner, pool.pool_name)
    return {
        "apiVersion": API_VERSION,
        "kind": POOL_KIND,
        "metadata": o.metadata(owner, name, "pool", pool.pool_name),
        "spec": {"role": pool.role, "deployment": name},
    }


def pool_seed(owner: Owner, pool: Pool) -> Obj:
    name = w.component_name(owner, pool.pool_name)
    meta = {"name": name, "namespace": owner.namespace, "annotations": {SEEDED: str(pool.replicas)}}
    return {"apiVersion": API_VERSION, "kind": POOL_KIND, "metadata": meta,
            "spec": {"replicas": pool.replicas}}


def scale_target(owner: Owner, name: str) -> str:
    """What the planner scales: the KvflowPool (operator) or the Deployment (plain manifests)."""
    return f"kvflowpools.{GROUP}/{name}" if owner.owned else f"deployments.apps/{name}"


def planner_rules(owner: Owner, names: list[str]) -> list[Obj]:
    group, plural = (GROUP, "kvflowpools") if owner.owned else ("apps", "deployments")
    return [
        {"apiGroups": [group], "resources": [f"{plural}/scale"], "resourceNames": names,
         "verbs": ["get", "patch", "update"]},
        {"apiGroups": [group], "resources": [plural], "verbs": ["get", "list", "watch"]},
    ]
