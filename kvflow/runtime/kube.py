"""A minimal Kubernetes API client: requests built as data (ApiRequest), sent with aiohttp.

Building a request is pure (tests check the method, path, headers and body);
`KubeClient` only sends it. aiohttp is imported when a client is made, so the
kvflow core never needs it (it comes with the `operator` extra). Credentials: the
pod's service account, or an explicit server URL (e.g. `kubectl proxy`).
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
APPLY_PATCH = "application/apply-patch+yaml"  # JSON is valid YAML
MERGE_PATCH = "application/merge-patch+json"
PLURALS = {
    "ConfigMap": "configmaps", "Service": "services", "ServiceAccount": "serviceaccounts",
    "Deployment": "deployments", "StatefulSet": "statefulsets", "Role": "roles",
    "RoleBinding": "rolebindings", "Lease": "leases", "KvflowDeployment": "kvflowdeployments",
    "KvflowPool": "kvflowpools", "CustomResourceDefinition": "customresourcedefinitions",
}


class KubeApiError(RuntimeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API {status}: {message}")
        self.status = status


class KubeConfigError(ValueError):
    """No way to reach the API server was given; the message says what to pass."""


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str  # absolute path with query string
    body: Any = None
    content_type: str = "application/json"

    def encoded_body(self) -> bytes | None:
        return None if self.body is None else json.dumps(self.body).encode()


def resource_path(api_version: str, kind_or_plural: str, namespace: str | None, name: str = "",
                  subresource: str = "") -> str:
    plural = PLURALS.get(kind_or_plural, kind_or_plural)
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}" if namespace else f"{root}/{plural}"
    if name:
        path += f"/{name}"
    return path + (f"/{subresource}" if subresource else "")


def object_path(obj: dict[str, Any], subresource: str = "") -> str:
    meta = obj["metadata"]
    return resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], subresource)


def apply_request(obj: dict[str, Any], manager: str, *, force: bool = True) -> ApiRequest:
    """Server-side apply of one object under a field manager."""
    query = urlencode({"fieldManager": manager, "force": "true" if force else "false"})
    return ApiRequest("PATCH", f"{object_path(obj)}?{query}", obj, APPLY_PATCH)


def status_patch_request(obj: dict[str, Any], status: dict[str, Any]) -> ApiRequest:
    return ApiRequest("PATCH", object_path(obj, "status"), {"status": status}, MERGE_PATCH)


def delete_request(obj: dict[str, Any]) -> ApiRequest:
    """Delete one object; its dependents go in the background (garbage collector)."""
    return ApiRequest("DELETE", f"{object_path(obj)}?propagationPolicy=Background")


def list_request(api_version: str, kind: str, namespace: str, selector: dict[str, str]) -> ApiRequest:
    query = urlencode({"labelSelector": ",".join(f"{k}={v}" for k, v in sorted(selector.items()))})
    return ApiRequest("GET", f"{resource_path(api_version, kind, namespace)}?{query}")


@dataclass(frozen=True)
class KubeConfig:
    server: str
    token: str = ""
    ca_file: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def in_cluster(cls) -> KubeConfig:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not (SA_DIR / "token").exists():
            raise KubeConfigError("not in a pod with a service account: pass --api-server URL "
                                  "(e.g. run `kubectl proxy` and use http://127.0.0.1:8001)")
        server = f"https://{host}:{port or 443}"
        return cls(server, (SA_DIR / "token").read_text().strip(), str(SA_DIR / "ca.crt"))


class KubeClient:
    """Sends ApiRequests; one aiohttp session per client."""

    def __init__(self, config: KubeConfig) -> None:
        import aiohttp  # the operator extra

        self.config = config
        headers = {"Accept": "application/json", **config.headers}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        ctx = ssl.create_default_context(cafile=config.ca_file) if config.ca_file else None
        connector = aiohttp.TCPConnector(ssl=ctx) if ctx else None
        self._session = aiohttp.ClientSession(headers=headers, connector=connector)

    async def send(self, request: ApiRequest) -> dict[str, Any]:
        async with self._session.request(
            request.method, self.config.server.rstrip("/") + request.path,
            data=request.encoded_body(), headers={"Content-Type": request.content_type},
        ) as resp:
            text = await resp.text()
            body = json.loads(text) if text else {}
            if resp.status >= 400:
                raise KubeApiError(resp.status, body.get("message", text[:200]))
            return body

    async def close(self) -> None:
        await self._session.close()
