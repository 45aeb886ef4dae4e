"""Small builders of Kubernetes objects as plain dicts: metadata, labels, owners, workloads.

Every object the operator (or the plain-manifest generator) emits is built here
or from these pieces, so labels, owner references and the spec-hash annotation
are the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kvflow.operator.spec import API_VERSION, KIND, Resource

Obj = dict[str, Any]
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_POOL = "kvflow.dev/pool"
SPEC_HASH = "kvflow.dev/spec-hash"  # on a workload: hash of its pod template as last applied
CONFIG_HASH = "kvflow.dev/config-hash"  # on a pod template: rolls pods when the ConfigMap changes


@dataclass(frozen=True)
class Owner:
    """Whose objects these are: the CR (operator mode) or nobody (plain manifests)."""

    resource: Resource
    managed_by: str = "kvflow-operator"
    owned: bool = True  # False: plain manifests, no owner references

    @property
    def name(self) -> str:
        return self.resource.name

    @property
    def namespace(self) -> str:
        return self.resource.namespace


def selector_labels(owner: Owner, component: str, pool: str = "") -> dict[str, str]:
    labels = {LABEL_NAME: "kvflow", LABEL_INSTANCE: owner.name, LABEL_COMPONENT: component}
    if pool:
        labels[LABEL_POOL] = pool
    return labels


def labels_for(owner: Owner, component: str, pool: str = "") -> dict[str, str]:
    return {**selector_labels(owner, component, pool), LABEL_MANAGED_BY: owner.managed_by}


def metadata(owner: Owner, name: str, component: str, pool: str = "") -> Obj:
    meta: Obj = {"name": name, "namespace": owner.namespace, "labels": labels_for(owner, component, pool)}
    if owner.owned:
        meta["ownerReferences"] = [owner_reference(owner.resource)]
    return meta


def owner_reference(resource: Resource) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": resource.name,
        "uid": resource.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def stable_hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pod_template(labels: dict[str, str], pod_spec: Obj, annotations: dict[str, str]) -> Obj:
    meta: Obj = {"labels": labels}
    if annotations:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": pod_spec}


def workload(kind: str, meta: Obj, selector: dict[str, str], template: Obj, replicas: int,
             extra: Obj | None = None) -> Obj:
    """A Deployment or StatefulSet whose metadata carries the hash of its pod template."""
    meta = {**meta, "annotations": {SPEC_HASH: stable_hash(template)}}
    spec: Obj = {"replicas": replicas, "selector": {"matchLabels": selector}, "template": template}
    spec.update(extra or {})
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": spec}


def service(meta: Obj, selector: dict[str, str], ports: list[Obj], *, service_type: str = "ClusterIP",
            headless: bool = False) -> Obj:
    spec: Obj = {"selector": selector, "ports": ports}
    if headless:
        spec["clusterIP"] = "None"
    elif service_type != "ClusterIP":
        spec["type"] = service_type
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def port(name: str, number: int) -> Obj:
    return {"name": name, "port": number, "targetPort": number, "protocol": "TCP"}


def config_map(meta: Obj, data: dict[str, str]) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def http_probe(path: str, port_number: int, period: int = 5, failures: int = 3) -> Obj:
    return {
        "httpGet": {"path": path, "port": port_number},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def container(name: str, image: str, command: list[str], **fields: Any) -> Obj:
    out: Obj = {"name": name, "image": image, "command": command}
    out.update({k: v for k, v in fields.items() if v})
    return out
