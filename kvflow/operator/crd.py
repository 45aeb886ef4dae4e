"""The two CustomResourceDefinitions: KvflowDeployment (the serving graph) and KvflowPool (one scalable pool).

The KvflowDeployment schema is generated from the spec structs in spec.py
(msgspec's JSON schema, with references inlined and the choices and bounds
added), so the API server and the operator accept the same documents.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvflow.operator import spec as s
from kvflow.operator.objects import Obj

ENUMS = {
    ("Pool", "role"): s.ROLES,
    ("Frontend", "routerMode"): s.ROUTER_MODES,
    ("Frontend", "serviceType"): s.SERVICE_TYPES,
    ("Backends", "discovery"): ("etcd",),
    ("Backends", "eventPlane"): s.EVENT_PLANES,
    ("Backends", "requestPlane"): s.REQUEST_PLANES,
    ("KvflowSpec", "imagePullPolicy"): ("Always", "IfNotPresent", "Never"),
}
NON_NEGATIVE = {("Pool", "replicas"), ("Pool", "gpus"), ("Frontend", "replicas"),
                ("Planner", "minReplicas"), ("Planner", "maxReplicas")}
DESCRIPTIONS = {
    ("KvflowSpec", "image"): "container image with kvflow installed (runs `kvflow …`)",
    ("KvflowSpec", "pools"): "worker pools; prefill and decode pools together mean disaggregated serving",
    ("Model", "path"): "model directory (in the image or under mountPath) or a hub id",
    ("Model", "pvc"): "PersistentVolumeClaim holding models, mounted read-only at mountPath",
    ("Engine", "name"): "engine registered in kvflow: mocker, echo, native, ...",
    ("Engine", "args"): "extra `kvflow worker` flags for every pool",
    ("Pool", "replicas"): "seeds the pool's KvflowPool; scale the KvflowPool afterwards",
    ("Pool", "gpus"): "nvidia.com/gpu limit per worker pod",
    ("Planner", "enabled"): "run `kvflow planner`, which scales the pools through their scale subresource",
    ("Etcd", "managed"): "run a one-member etcd StatefulSet; false: use endpoints",
    ("Nats", "managed"): "run a one-server NATS StatefulSet; false: use url",
}


def _inline(node: Any, defs: dict[str, Any], owner: str = "") -> Any:
    """msgspec schema → a structural schema: no $ref, titles, required: [] or additionalProperties."""
    if isinstance(node, list):
        return [_inline(x, defs, owner) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        return _inline(defs[name], defs, name)
    out = {}
    for key, value in node.items():
        if key in ("title", "additionalProperties") or (key == "required" and not value):
            continue
        if key == "properties":
            out[key] = {k: _property(owner, k, v, defs) for k, v in value.items()}
        else:
            out[key] = _inline(value, defs, owner)
    return out


def _property(owner: str, name: str, node: Obj, defs: dict[str, Any]) -> Obj:
    node = dict(node)
    if isinstance(node.get("default"), (dict, list)):
        node.pop("default")  # nested defaults apply; whole-object defaults only bloat the CRD
    out = _inline(node, defs, owner)
    if (owner, name) in ENUMS:
        out["enum"] = list(ENUMS[owner, name])
    if (owner, name) in NON_NEGATIVE:
        out["minimum"] = 0
    if (owner, name) in DESCRIPTIONS:
        out["description"] = DESCRIPTIONS[owner, name]
    return out


def spec_schema() -> Obj:
    raw = msgspec.json.schema(s.KvflowSpec)
    return _inline(raw, raw["$defs"])


def _condition_schema() -> Obj:
    props = {k: {"type": "string"} for k in ("type", "status", "reason", "message", "lastTransitionTime")}
    props["observedGeneration"] = {"type": "integer"}
    return {"type": "object", "required": ["type", "status"], "properties": props}


def deployment_status_schema() -> Obj:
    component = {"type": "object", "properties": {
        "replicas": {"type": "integer"}, "readyReplicas": {"type": "integer"},
        "updatedReplicas": {"type": "integer"}, "ready": {"type": "boolean"}}}
    return {"type": "object", "properties": {
        "observedGeneration": {"type": "integer"},
        "conditions": {"type": "array", "items": _condition_schema()},
        "components": {"type": "object", "additionalProperties": component},
        "error": {"type": "string", "description": "why the last reconcile failed, if it did"},
    }}


def _crd(kind: str, plural: str, short: str, schema: Obj, subresources: Obj, columns: list[Obj]) -> Obj:
    version = {
        "name": s.VERSION, "served": True, "storage": True,
        "schema": {"openAPIV3Schema": schema},
        "subresources": subresources,
        "additionalPrinterColumns": columns,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{s.GROUP}"},
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": kind.lower(), "shortNames": [short]},
            "versions": [version],
        },
    }


def _column(name: str, path: str, kind: str = "string") -> Obj:
    return {"name": name, "type": kind, "jsonPath": path}


def deployment_crd() -> Obj:
    schema = {"type": "object", "description": "A kvflow serving graph: frontend, router, worker pools, "
              "planner and their etcd/NATS.", "required": ["spec"],
              "properties": {"spec": spec_schema(), "status": deployment_status_schema()}}
    columns = [_column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
               _column("Age", ".metadata.creationTimestamp", "date")]
    return _crd(s.KIND, "kvflowdeployments", "kvd", schema, {"status": {}}, columns)


def pool_crd() -> Obj:
    spec = {"type": "object", "required": ["role", "deployment"], "properties": {
        "role": {"type": "string", "enum": list(s.ROLES)},
        "deployment": {"type": "string", "description": "the Deployment this pool sizes"},
        "replicas": {"type": "integer", "minimum": 0, "default": 1},
    }}
    status = {"type": "object", "properties": {
        "replicas": {"type": "integer"}, "readyReplicas": {"type": "integer"},
        "selector": {"type": "string"}}}
    schema = {"type": "object", "description": "One worker pool of a KvflowDeployment; its scale "
              "subresource is what the planner and HPAs set.",
              "properties": {"spec": spec, "status": status}}
    scale = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
             "labelSelectorPath": ".status.selector"}
    columns = [_column("Role", ".spec.role"), _column("Replicas", ".spec.replicas", "integer"),
               _column("Ready", ".status.readyReplicas", "integer")]
    return _crd(s.POOL_KIND, "kvflowpools", "kvp", schema, {"status": {}, "scale": scale}, columns)


def crds() -> list[Obj]:
    return [deployment_crd(), pool_crd()]
