"""A scripted stand-in for the Kubernetes API on loopback, for operator tests (there is no cluster here).

It keeps objects in a dict and answers what the operator and kopf call:
discovery (/version, /api, /apis), list (by namespace or cluster-wide, by
label), watch (a stream of ADDED/MODIFIED events after each write), get,
server-side apply and merge patches as a deep merge (status and scale too),
create, PUT with resourceVersion checks, delete; it records every request. It is not
Kubernetes: no admission, defaulting, field managers or conflicts, no
garbage collection, no controllers (tests play the Deployment controller by
writing status with `put_status`).
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

Obj = dict[str, Any]
# (group, version, plural, kind, namespaced, subresources)
RESOURCES = [
    ("", "v1", "configmaps", "ConfigMap", True, ()),
    ("", "v1", "services", "Service", True, ()),
    ("", "v1", "serviceaccounts", "ServiceAccount", True, ()),
    ("", "v1", "events", "Event", True, ()),
    ("", "v1", "namespaces", "Namespace", False, ()),
    ("apps", "v1", "deployments", "Deployment", True, ("status", "scale")),
    ("apps", "v1", "statefulsets", "StatefulSet", True, ("status", "scale")),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role", True, ()),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, ()),
    ("coordination.k8s.io", "v1", "leases", "Lease", True, ()),
    ("kvflow.dev", "v1alpha1", "kvflowdeployments", "KvflowDeployment", True, ("status",)),
    ("kvflow.dev", "v1alpha1", "kvflowpools", "KvflowPool", True, ("status", "scale")),
]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any


@dataclass(frozen=True)
class Route:
    prefix: str  # /api/v1 or /apis/<group>/<version>
    plural: str
    namespace: str = ""
    name: str = ""
    sub: str = ""

    @classmethod
    def parse(cls, path: str) -> Route | None:
        parts = path.strip("/").split("/")
        split = 2 if parts[0] == "api" else 3
        if len(parts) <= split:
            return None
        prefix, rest = "/" + "/".join(parts[:split]), parts[split:]
        ns = ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        name, sub = [*rest[1:3], "", ""][:2]
        return cls(prefix, rest[0], ns, name, sub)

    def key(self) -> str:
        ns = f"/namespaces/{self.namespace}" if self.namespace else ""
        return f"{self.prefix}{ns}/{self.plural}/{self.name}"

    def collects(self, key: str) -> bool:
        other = Route.parse(key)
        return (other is not None and (other.prefix, other.plural) == (self.prefix, self.plural)
                and (not self.namespace or other.namespace == self.namespace))


def merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base.get(key), value) if value is not None else None
        return {k: v for k, v in out.items() if v is not None}
    return copy.deepcopy(patch)


@dataclass
class ScriptedApi:
    objects: dict[str, Obj] = field(default_factory=dict)  # object path → object
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""
    _version: int = 0
    _runner: web.AppRunner | None = None
    _watchers: list[tuple[Route, asyncio.Queue]] = field(default_factory=list)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        self._closing.set()
        for _, queue in self._watchers:
            queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    def store(self, key: str, obj: Obj, event: str = "MODIFIED") -> Obj:
        """Write an object as the server would: new resourceVersion, watchers told (no-ops are silent)."""
        old = self.objects.get(key)
        if old is not None and _same(old, obj):
            return old
        self._version += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._version)
        self.objects[key] = obj
        for route, queue in self._watchers:
            if route.collects(key):
                queue.put_nowait({"type": "ADDED" if old is None else event, "object": obj})
        return obj

    def delete(self, key: str) -> None:
        obj = self.objects.pop(key)
        for route, queue in self._watchers:
            if route.collects(key):
                queue.put_nowait({"type": "DELETED", "object": obj})

    def put_status(self, key: str, status: Obj) -> None:
        self.store(key, {**copy.deepcopy(self.objects[key]), "status": status})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        text = await request.text()
        body = json.loads(text) if text else None
        query = {k: v[0] for k, v in parse_qs(request.query_string).items()}
        self.requests.append(Recorded(request.method, request.path, query,
                                      request.headers.get("Content-Type", ""), copy.deepcopy(body)))
        route = Route.parse(request.path)
        if route is None:
            return web.json_response(_discovery(request.path))
        if request.method == "GET" and not route.name and route.plural:
            if query.get("watch") in ("true", "1"):
                return await self._watch(request, route)
            return self._list(route, query)
        return self._object(request.method, route, body)

    def _list(self, route: Route, query: dict[str, str]) -> web.Response:
        want = dict(p.split("=", 1) for p in query.get("labelSelector", "").split(",") if p)
        items = [o for k, o in self.objects.items() if route.collects(k)
                 and want.items() <= (o["metadata"].get("labels") or {}).items()]
        meta = {"resourceVersion": str(self._version)}
        return web.json_response({"kind": "List", "apiVersion": "v1", "metadata": meta, "items": items})

    async def _watch(self, request: web.Request, route: Route) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        entry = (route, queue)
        self._watchers.append(entry)
        try:
            while not self._closing.is_set():
                event = await queue.get()
                if event is None:
                    break
                await resp.write(json.dumps(event).encode() + b"\n")
        finally:
            self._watchers.remove(entry)
        return resp

    def _object(self, method: str, route: Route, body: Any) -> web.Response:
        key = route.key()
        old = self.objects.get(key)
        if method == "GET":
            if old is None:
                return _error(404, f"{key} not found")
            return web.json_response(_scale(old) if route.sub == "scale" else old)
        if method == "POST":
            key = f"{route.key()}{body['metadata']['name']}"
            if key in self.objects:
                return _error(409, "already exists")
            return web.json_response(self.store(key, copy.deepcopy(body)), status=201)
        if method == "DELETE":
            if old is None:
                return _error(404, f"{key} not found")
            self.delete(key)
            return web.json_response({"kind": "Status", "status": "Success"})
        if method == "PUT":
            if old and old["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
                return _error(409, "the object has been modified")
            return web.json_response(self.store(key, copy.deepcopy(body)))
        if old is None and route.sub:
            return _error(404, f"{key} not found")
        if isinstance(body, list):  # JSON patch (kopf's finalizers): not needed here
            return web.json_response(old or {})
        obj = self.store(key, merge(old or {}, body))
        return web.json_response(_scale(obj) if route.sub == "scale" else obj)


def _same(a: Obj, b: Obj) -> bool:
    strip = [{**x, "metadata": {k: v for k, v in x.get("metadata", {}).items() if k != "resourceVersion"}}
             for x in (a, b)]
    return strip[0] == strip[1]


def _discovery(path: str) -> Obj:
    parts = path.strip("/").split("/")
    if parts == ["version"]:
        return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-scripted"}
    if parts == ["api"]:
        return {"kind": "APIVersions", "versions": ["v1"]}
    if parts[0] == "api":
        return resource_list("", parts[1])
    if len(parts) == 3:
        return resource_list(parts[1], parts[2])
    groups = sorted({(g, v) for g, v, *_ in RESOURCES if g})
    return {"kind": "APIGroupList", "groups": [
        {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
         "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in groups]}


def resource_list(group: str, version: str) -> Obj:
    out = []
    for g, v, plural, kind, namespaced, subs in RESOURCES:
        if (g, v) != (group, version):
            continue
        verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
        out.append({"name": plural, "singularName": kind.lower(), "namespaced": namespaced,
                    "kind": kind, "verbs": verbs})
        out += [{"name": f"{plural}/{s}", "singularName": "", "namespaced": namespaced, "kind": kind,
                 "verbs": ["get", "patch", "update"]} for s in subs]
    return {"kind": "APIResourceList", "groupVersion": f"{group}/{version}" if group else version,
            "resources": out}


def _scale(obj: Obj) -> Obj:
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "spec": {"replicas": obj.get("spec", {}).get("replicas", 0)},
            "status": {"replicas": obj.get("status", {}).get("replicas", 0)}}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "status": "Failure", "message": message, "code": status},
                             status=status)
