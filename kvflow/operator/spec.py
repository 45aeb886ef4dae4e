"""The KvflowDeployment custom resource as typed, frozen structs, checked once when parsed.

The CRD's OpenAPI schema (crd.py) catches shapes at the API server; this module
catches the same and the cross-field rules (pool names unique, prefill needs
decode) so the reconcile step works on a spec it can trust. Field names in the
YAML are camelCase; here they are snake_case.
"""

from __future__ import annotations

import re

import msgspec

GROUP = "kvflow.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "KvflowDeployment"
POOL_KIND = "KvflowPool"
ROLES = ("aggregated", "prefill", "decode")
ROUTER_MODES = ("kv", "round-robin", "random", "least-loaded", "direct")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
EVENT_PLANES = ("nats", "zmq")
REQUEST_PLANES = ("tcp", "nats")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SpecError(ValueError):
    """A KvflowDeployment the operator cannot serve; the message says what to change."""


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    pass


class Model(_Spec):
    path: str  # a directory in the image / on the volume, or a hub id
    name: str = ""  # the name clients use; default: the path
    pvc: str = ""  # a PersistentVolumeClaim mounted read-only at mount_path
    mount_path: str = "/models"


class Engine(_Spec):
    name: str = "mocker"
    args: tuple[str, ...] = ()


class Frontend(_Spec):
    replicas: int = 1
    port: int = 8000
    service_type: str = "ClusterIP"
    router_mode: str = "kv"
    args: tuple[str, ...] = ()


class EnvVar(_Spec):
    name: str
    value: str = ""


class Pool(_Spec):
    role: str = "aggregated"
    name: str = ""  # default: the role
    replicas: int = 1  # seeds the KvflowPool; afterwards the pool's scale subresource rules
    gpus: int = 0
    cpu: str = ""
    memory: str = ""
    env: tuple[EnvVar, ...] = ()
    args: tuple[str, ...] = ()

    @property
    def pool_name(self) -> str:
        return self.name or self.role


class Planner(_Spec):
    enabled: bool = False
    ttft_ms: float = 500.0
    itl_ms: float = 50.0
    interval_s: float = 30.0
    min_replicas: int = 1
    max_replicas: int = 8


class Etcd(_Spec):
    managed: bool = True  # run a one-member etcd StatefulSet for this deployment
    endpoints: str = ""  # when not managed: the cluster's etcd, e.g. http://etcd.infra:2379
    image: str = "quay.io/coreos/etcd:v3.5.17"


class Nats(_Spec):
    managed: bool = True
    url: str = ""  # when not managed, e.g. nats://nats.infra:4222
    image: str = "nats:2.10-alpine"


class Backends(_Spec):
    discovery: str = "etcd"  # the only discovery backend that spans pods
    event_plane: str = "nats"
    request_plane: str = "tcp"
    etcd: Etcd = Etcd()
    nats: Nats = Nats()


class KvflowSpec(_Spec):
    image: str
    model: Model
    pools: tuple[Pool, ...]
    image_pull_policy: str = "IfNotPresent"
    engine: Engine = Engine()
    frontend: Frontend = Frontend()
    planner: Planner = Planner()
    backends: Backends = Backends()


class Resource(msgspec.Struct, frozen=True):
    """A parsed KvflowDeployment: who it is, and its checked spec."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: KvflowSpec


def parse_resource(obj: dict) -> Resource:
    """A KvflowDeployment object (as the API returns it) → Resource; SpecError if it is wrong."""
    meta = obj.get("metadata") or {}
    if not meta.get("name"):
        raise SpecError("metadata.name is missing")
    spec = parse_spec(obj.get("spec") or {})
    return Resource(
        name=meta["name"],
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 1),
        spec=spec,
    )


def parse_spec(raw: dict) -> KvflowSpec:
    try:
        spec = msgspec.convert(raw, KvflowSpec)
    except msgspec.ValidationError as exc:
        raise SpecError(f"spec: {exc}".replace("`$", "`spec")) from None
    check_spec(spec)
    return spec


def check_spec(spec: KvflowSpec) -> None:
    _check_choice("frontend.routerMode", spec.frontend.router_mode, ROUTER_MODES)
    _check_choice("frontend.serviceType", spec.frontend.service_type, SERVICE_TYPES)
    _check_choice("backends.discovery", spec.backends.discovery, ("etcd",))
    _check_choice("backends.eventPlane", spec.backends.event_plane, EVENT_PLANES)
    _check_choice("backends.requestPlane", spec.backends.request_plane, REQUEST_PLANES)
    _check_pools(spec.pools)
    _check_backends(spec.backends)
    if spec.frontend.replicas < 0:
        raise SpecError("frontend.replicas must be >= 0")
    p = spec.planner
    if p.enabled and not 0 <= p.min_replicas <= p.max_replicas:
        raise SpecError("planner: need 0 <= minReplicas <= maxReplicas")


def _check_pools(pools: tuple[Pool, ...]) -> None:
    if not pools:
        raise SpecError("spec.pools is empty: add at least one pool (role: aggregated)")
    names = [p.pool_name for p in pools]
    for i, pool in enumerate(pools):
        _check_choice(f"pools[{i}].role", pool.role, ROLES)
        if not DNS_LABEL.match(pool.pool_name) or len(pool.pool_name) > 30:
            raise SpecError(f"pool name {pool.pool_name!r}: use lowercase letters, digits and '-' (<= 30)")
        if pool.replicas < 0 or pool.gpus < 0:
            raise SpecError(f"pool {pool.pool_name}: replicas and gpus must be >= 0")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"pool names must be unique; repeated: {', '.join(dupes)} (set pools[].name)")
    roles = {p.role for p in pools}
    if ("prefill" in roles) != ("decode" in roles):
        raise SpecError("disaggregated serving needs both a prefill pool and a decode pool")


def _check_backends(b: Backends) -> None:
    if not b.etcd.managed and not b.etcd.endpoints:
        raise SpecError("backends.etcd.managed is false: set backends.etcd.endpoints")
    uses_nats = "nats" in (b.event_plane, b.request_plane)
    if uses_nats and not b.nats.managed and not b.nats.url:
        raise SpecError("backends.nats.managed is false: set backends.nats.url")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def uses_nats(spec: KvflowSpec) -> bool:
    return "nats" in (spec.backends.event_plane, spec.backends.request_plane)
