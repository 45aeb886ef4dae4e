"""A scripted stand-in for the Kubernetes API on loopback, for operator tests (there is no cluster here).

It keeps objects in a dict and answers the few calls the operator makes (list
by label, get, server-side apply as a deep merge, merge patches of status and
scale, create, PUT with resourceVersion checks) and records every request. It
is not Kubernetes: no admission, no defaulting, no field-manager conflicts, no
controllers (tests play the Deployment controller by setting status).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

Obj = dict[str, Any]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any


def merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base.get(key), value) if value is not None else None
        return {k: v for k, v in out.items() if v is not None}
    return patch


@dataclass
class ScriptedApi:
    objects: dict[str, Obj] = field(default_factory=dict)  # collection path + "/" + name → object
    requests: list[Recorded] = field(default_factory=list)
    _version: int = 0
    _runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def get(self, path: str) -> Obj | None:
        return self.objects.get(path)

    def _bump(self, obj: Obj) -> Obj:
        self._version += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._version)
        return obj

    async def handle(self, request: web.Request) -> web.Response:
        text = await request.text()
        body = json.loads(text) if text else None
        query = {k: v[0] for k, v in parse_qs(request.query_string).items()}
        self.requests.append(Recorded(request.method, request.path, query,
                                      request.headers.get("Content-Type", ""), copy.deepcopy(body)))
        path = request.path
        parts = path.rstrip("/").split("/")
        sub = parts[-1] if parts[-1] in ("status", "scale") and len(parts) > 7 else ""
        key = "/".join(parts[:-1]) if sub else path
        if request.method == "GET":
            return self._get(key, sub, query)
        if request.method == "POST":
            name = body["metadata"]["name"]
            if f"{key}/{name}" in self.objects:
                return _error(409, "already exists")
            self.objects[f"{key}/{name}"] = self._bump(body)
            return web.json_response(body, status=201)
        if request.method == "PUT":
            old = self.objects.get(key)
            if old and old["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
                return _error(409, "the object has been modified")
            self.objects[key] = self._bump(body)
            return web.json_response(body)
        return self._patch(key, sub, body)

    def _get(self, key: str, sub: str, query: dict[str, str]) -> web.Response:
        if "labelSelector" in query:
            want = dict(p.split("=", 1) for p in query["labelSelector"].split(",") if p)
            items = [o for k, o in self.objects.items() if k.rsplit("/", 1)[0] == key
                     and want.items() <= (o["metadata"].get("labels") or {}).items()]
            return web.json_response({"kind": "List", "items": items})
        obj = self.objects.get(key)
        if obj is None:
            return _error(404, f"{key} not found")
        return web.json_response(_scale(obj) if sub == "scale" else obj)

    def _patch(self, key: str, sub: str, body: Obj) -> web.Response:
        old = self.objects.get(key)
        if old is None and sub:
            return _error(404, f"{key} not found")
        obj = self._bump(merge(old or {}, body))
        self.objects[key] = obj
        return web.json_response(_scale(obj) if sub == "scale" else obj)


def _scale(obj: Obj) -> Obj:
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "spec": {"replicas": obj.get("spec", {}).get("replicas", 0)},
            "status": {"replicas": obj.get("status", {}).get("replicas", 0)}}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "status": "Failure", "message": message, "code": status},
                             status=status)
