"""The serving graph's own workloads: runtime ConfigMap, frontend, one Deployment per pool, planner.

Pod commands are the `kvflow` CLI (`kvflow frontend`, `kvflow worker --role …`,
`kvflow planner`); the runtime backends reach every pod as KVFLOW_* environment
variables from one ConfigMap, read by kvflow.runtime.config like anywhere else.
"""

from __future__ import annotations

from kvflow.operator import objects as o
from kvflow.operator.objects import Obj, Owner
from kvflow.operator.spec import Pool, uses_nats

SYSTEM_PORT = 9090  # every kvflow process's /health, /live, /metrics
REQUEST_PORT = 9345  # the TCP request plane of a worker


def component_name(owner: Owner, component: str) -> str:
    return f"{owner.name}-{component}"


def etcd_endpoints(owner: Owner) -> str:
    etcd = owner.resource.spec.backends.etcd
    return f"http://{component_name(owner, 'etcd')}:2379" if etcd.managed else etcd.endpoints


def nats_url(owner: Owner) -> str:
    nats = owner.resource.spec.backends.nats
    return f"nats://{component_name(owner, 'nats')}:4222" if nats.managed else nats.url


def runtime_env(owner: Owner) -> dict[str, str]:
    """KVFLOW_* variables every pod gets (names as kvflow.runtime.config reads them)."""
    b = owner.resource.spec.backends
    env = {
        "KVFLOW_NAMESPACE": f"{owner.namespace}-{owner.name}".replace(".", "-"),
        "KVFLOW_DISCOVERY": b.discovery,
        "KVFLOW_ETCD_ENDPOINTS": etcd_endpoints(owner),
        "KVFLOW_EVENT_PLANE": b.event_plane,
        "KVFLOW_REQUEST_PLANE": b.request_plane,
        "KVFLOW_SYSTEM_HOST": "0.0.0.0",
        "KVFLOW_SYSTEM_PORT": str(SYSTEM_PORT),
        "KVFLOW_TCP_PORT": str(REQUEST_PORT),
    }
    if uses_nats(owner.resource.spec):
        env["KVFLOW_NATS_URL"] = nats_url(owner)
    return env


def runtime_config_map(owner: Owner) -> Obj:
    meta = o.metadata(owner, component_name(owner, "runtime"), "runtime")
    return o.config_map(meta, runtime_env(owner))


def _pod_spec(owner: Owner, main: Obj, extra_env: list[Obj], service_account: str = "") -> Obj:
    spec = owner.resource.spec
    env = [{"name": "KVFLOW_ADVERTISE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    main = {
        **main,
        "imagePullPolicy": spec.image_pull_policy,
        "envFrom": [{"configMapRef": {"name": component_name(owner, "runtime")}}],
        "env": env + extra_env,
    }
    pod: Obj = {"containers": [main]}
    if spec.model.pvc:
        main["volumeMounts"] = [{"name": "model", "mountPath": spec.model.mount_path, "readOnly": True}]
        pod["volumes"] = [{"name": "model", "persistentVolumeClaim": {"claimName": spec.model.pvc,
                                                                     "readOnly": True}}]
    if service_account:
        pod["serviceAccountName"] = service_account
    return pod


def _deployment(owner: Owner, component: str, pod: Obj, replicas: int, pool: str = "") -> Obj:
    name = component_name(owner, pool or component)
    annotations = {o.CONFIG_HASH: o.stable_hash(runtime_env(owner))}
    template = o.pod_template(o.labels_for(owner, component, pool), pod, annotations)
    meta = o.metadata(owner, name, component, pool)
    return o.workload("Deployment", meta, o.selector_labels(owner, component, pool), template, replicas)


def frontend(owner: Owner) -> list[Obj]:
    spec = owner.resource.spec
    fe = spec.frontend
    command = ["kvflow", "frontend", "--http-host", "0.0.0.0", "--http-port", str(fe.port),
               "--router-mode", fe.router_mode, *fe.args]
    main = o.container(
        "frontend", spec.image, command,
        ports=[{"name": "http", "containerPort": fe.port}],
        readinessProbe=o.http_probe("/health", fe.port),
        livenessProbe=o.http_probe("/live", fe.port, period=10),
    )
    deployment = _deployment(owner, "frontend", _pod_spec(owner, main, []), fe.replicas)
    meta = o.metadata(owner, component_name(owner, "frontend"), "frontend")
    svc = o.service(meta, o.selector_labels(owner, "frontend"), [o.port("http", fe.port)],
                    service_type=fe.service_type)
    return [deployment, svc]


def worker_command(owner: Owner, pool: Pool) -> list[str]:
    spec = owner.resource.spec
    command = ["kvflow", "worker"]
    if pool.role != "aggregated":  # aggregated is the worker's default role
        command += ["--role", pool.role]
    command += ["--engine", spec.engine.name, "--model-path", model_path(owner)]
    command += ["--model-name", spec.model.name or spec.model.path]
    return [*command, *spec.engine.args, *pool.args]


def model_path(owner: Owner) -> str:
    model = owner.resource.spec.model
    if model.pvc and not model.path.startswith("/"):
        return f"{model.mount_path.rstrip('/')}/{model.path}"
    return model.path


def resources(pool: Pool) -> Obj:
    requests = {k: v for k, v in (("cpu", pool.cpu), ("memory", pool.memory)) if v}
    limits = dict(requests)
    if pool.gpus:
        limits["nvidia.com/gpu"] = str(pool.gpus)
    out: Obj = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pool_deployment(owner: Owner, pool: Pool, replicas: int) -> Obj:
    main = o.container(
        "worker", owner.resource.spec.image, worker_command(owner, pool),
        ports=[{"name": "request", "containerPort": REQUEST_PORT},
               {"name": "system", "containerPort": SYSTEM_PORT}],
        readinessProbe=o.http_probe("/health", SYSTEM_PORT),
        livenessProbe=o.http_probe("/live", SYSTEM_PORT, period=10),
        resources=resources(pool),
    )
    env = [{"name": e.name, "value": e.value} for e in pool.env]
    return _deployment(owner, "worker", _pod_spec(owner, main, env), replicas, pool=pool.pool_name)


def planner_command(owner: Owner, targets: list[str]) -> list[str]:
    """`kvflow planner` scaling this resource's pools (targets in pool order) through their scale."""
    spec = owner.resource.spec
    p = spec.planner
    roles = [pool.role for pool in spec.pools]
    mode = "aggregated" if set(roles) == {"aggregated"} else "disaggregated"
    pairs = ",".join(f"{role}={target}" for role, target in zip(roles, targets, strict=True))
    frontend = f"http://{component_name(owner, 'frontend')}.{owner.namespace}.svc:{spec.frontend.port}"
    return [
        "kvflow", "planner", "--connector", "kubernetes", "--apply", "--mode", mode,
        "--k8s-namespace", owner.namespace, "--k8s-scale-targets", pairs, "--frontend-urls", frontend,
        "--ttft-p90-s", f"{p.ttft_ms / 1000:g}", "--itl-p90-s", f"{p.itl_ms / 1000:g}",
        "--interval-s", f"{p.interval_s:g}",
        "--min-workers", str(p.min_replicas), "--max-workers", str(p.max_replicas),
    ]


def planner(owner: Owner, targets: list[str], rbac_rules: list[Obj]) -> list[Obj]:
    """The planner Deployment, and the account that may patch only its pools' scale."""
    name = component_name(owner, "planner")
    # The planner serves no HTTP: it reads the frontends' /metrics and patches scale.
    main = o.container("planner", owner.resource.spec.image, planner_command(owner, targets))
    deployment = _deployment(owner, "planner", _pod_spec(owner, main, [], service_account=name), 1)
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": o.metadata(owner, name, "planner")}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": o.metadata(owner, name, "planner"), "rules": rbac_rules}
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": o.metadata(owner, name, "planner"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }
    return [account, role, binding, deployment]
