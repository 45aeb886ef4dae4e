"""Status of a KvflowDeployment from observed workloads: Ready only when every current pod is ready.

A workload counts as ready when the object in the cluster carries the spec hash
we last applied (it is the current generation of our desired state), its
controller has observed its latest generation, and every pod it runs is updated
and ready — so a rolling update, where old pods still serve, is not Ready.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvflow.operator.objects import SPEC_HASH, Obj
from kvflow.operator.reconcile import Desired, Observed, object_key


@dataclass(frozen=True)
class WorkloadReadiness:
    name: str
    ready: bool
    reason: str  # why not (empty when ready)
    replicas: int  # desired
    ready_replicas: int
    updated_replicas: int


def workload_readiness(desired: Obj, observed: Obj | None) -> WorkloadReadiness:
    want = int(desired["spec"].get("replicas", 1))
    name = desired["metadata"]["name"]
    if observed is None:
        return WorkloadReadiness(name, False, "not created yet", want, 0, 0)
    st = observed.get("status") or {}
    ready, updated = int(st.get("readyReplicas", 0)), int(st.get("updatedReplicas", 0))
    reason = _not_ready_reason(desired, observed, want)
    return WorkloadReadiness(name, not reason, reason, want, ready, updated)


def _not_ready_reason(desired: Obj, observed: Obj, want: int) -> str:
    meta, st = observed["metadata"], observed.get("status") or {}
    if (meta.get("annotations") or {}).get(SPEC_HASH) != desired["metadata"]["annotations"][SPEC_HASH]:
        return "the latest spec is not applied yet"
    if int(st.get("observedGeneration", 0)) < int(meta.get("generation", 1)):
        return "its controller has not observed the latest generation"
    if int(observed["spec"].get("replicas", 1)) != want:
        return f"scaling to {want}"
    if observed["kind"] == "StatefulSet" and st.get("currentRevision") != st.get("updateRevision"):
        return "a rolling update is in progress"
    counts = [int(st.get(k, 0)) for k in ("replicas", "updatedReplicas", "readyReplicas")]
    if observed["kind"] == "Deployment":
        counts.append(int(st.get("availableReplicas", 0)))
    if any(c != want for c in counts):
        return f"pods: {counts[0]} total, {counts[1]} updated, {counts[2]} ready of {want}"
    return ""


def readiness(desired: Desired, observed: Observed) -> list[WorkloadReadiness]:
    out = []
    for obj in desired.objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            out.append(workload_readiness(obj, observed.objects.get(object_key(obj))))
    return out


def deployment_status(generation: int, desired: Desired, observed: Observed, now: str) -> Obj:
    """The KvflowDeployment's `status`: per-component counts and a Ready condition."""
    parts = readiness(desired, observed)
    waiting = [p for p in parts if not p.ready]
    ready = {
        "type": "Ready",
        "status": "False" if waiting else "True",
        "reason": "Waiting" if waiting else "AllPodsReady",
        "message": "; ".join(f"{p.name}: {p.reason}" for p in waiting) or "every pod of the current "
        "generation is ready",
        "observedGeneration": generation,
        "lastTransitionTime": now,
    }
    components = {p.name: {"replicas": p.replicas, "readyReplicas": p.ready_replicas,
                           "updatedReplicas": p.updated_replicas, "ready": p.ready} for p in parts}
    return {"observedGeneration": generation, "conditions": [ready], "components": components}


def keep_transition_time(new: Obj, old: Obj | None) -> Obj:
    """Conditions keep their lastTransitionTime while their status does not change."""
    before = {c["type"]: c for c in (old or {}).get("conditions", [])}
    conditions = []
    for cond in new["conditions"]:
        prev = before.get(cond["type"])
        if prev and prev.get("status") == cond["status"] and prev.get("lastTransitionTime"):
            cond = {**cond, "lastTransitionTime": prev["lastTransitionTime"]}
        conditions.append(cond)
    return {**new, "conditions": conditions}


def pool_status(selector: dict[str, str], observed: Obj | None) -> Obj:
    """A KvflowPool's `status`: what the scale subresource reports (replicas, selector)."""
    st = (observed or {}).get("status") or {}
    return {
        "replicas": int(st.get("replicas", 0)),
        "readyReplicas": int(st.get("readyReplicas", 0)),
        "selector": ",".join(f"{k}={v}" for k, v in sorted(selector.items())),
    }
