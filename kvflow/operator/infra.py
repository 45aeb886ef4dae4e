"""etcd and NATS for one KvflowDeployment, when the CR asks kvflow to run them: a StatefulSet + Service each.

Both are single-member and keep their data in an emptyDir: kvflow's state in
them (leased registrations, events in flight) is rebuilt by the workers after a
restart. A production cluster points backends.etcd / backends.nats at its own.
"""

from __future__ import annotations

from kvflow.operator import objects as o
from kvflow.operator.objects import Obj, Owner
from kvflow.operator.spec import uses_nats
from kvflow.operator.workloads import component_name


def infra(owner: Owner) -> list[Obj]:
    b = owner.resource.spec.backends
    out: list[Obj] = []
    if b.etcd.managed:
        out += etcd(owner)
    if b.nats.managed and uses_nats(owner.resource.spec):
        out += nats(owner)
    return out


def _stateful(owner: Owner, component: str, main: Obj, ports: list[Obj]) -> list[Obj]:
    name = component_name(owner, component)
    selector = o.selector_labels(owner, component)
    pod = {"containers": [main], "volumes": [{"name": "data", "emptyDir": {}}]}
    template = o.pod_template(o.labels_for(owner, component), pod, {})
    meta = o.metadata(owner, name, component)
    sts = o.workload("StatefulSet", meta, selector, template, 1, extra={"serviceName": name})
    svc = o.service(o.metadata(owner, name, component), selector, ports)
    return [sts, svc]


def etcd(owner: Owner) -> list[Obj]:
    name = component_name(owner, "etcd")
    command = [
        "etcd", "--name", name, "--data-dir", "/var/lib/etcd",
        "--listen-client-urls", "http://0.0.0.0:2379",
        "--advertise-client-urls", f"http://{name}:2379",
        "--listen-peer-urls", "http://0.0.0.0:2380",
    ]
    main = o.container(
        "etcd", owner.resource.spec.backends.etcd.image, command,
        ports=[{"name": "client", "containerPort": 2379}, {"name": "peer", "containerPort": 2380}],
        readinessProbe=o.http_probe("/health", 2379),
        volumeMounts=[{"name": "data", "mountPath": "/var/lib/etcd"}],
    )
    return _stateful(owner, "etcd", main, [o.port("client", 2379)])


def nats(owner: Owner) -> list[Obj]:
    command = ["nats-server", "--port", "4222", "--http_port", "8222", "--jetstream",
               "--store_dir", "/data"]
    main = o.container(
        "nats", owner.resource.spec.backends.nats.image, command,
        ports=[{"name": "client", "containerPort": 4222}, {"name": "monitor", "containerPort": 8222}],
        readinessProbe=o.http_probe("/healthz", 8222),
        volumeMounts=[{"name": "data", "mountPath": "/data"}],
    )
    return _stateful(owner, "nats", main, [o.port("client", 4222)])
