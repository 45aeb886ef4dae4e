"""The planner's Kubernetes connector: set a pool's replicas through its `scale` subresource.

A target is written `<plural>.<group>/<name>` as the operator passes it to
`kvflow planner --scale-target`: `kvflowpools.kvflow.dev/demo-decode` (a pool of
a KvflowDeployment) or `deployments.apps/demo-decode` (plain manifests). The
planner's loop (another module) decides the number; this module only asks.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvflow.runtime.kube import MERGE_PATCH, ApiRequest, KubeClient, resource_path

VERSIONS = {"kvflow.dev": "v1alpha1", "apps": "v1"}


@dataclass(frozen=True)
class ScaleTarget:
    group: str
    plural: str
    name: str
    namespace: str

    @classmethod
    def parse(cls, text: str, namespace: str) -> ScaleTarget:
        try:
            resource, name = text.split("/")
            plural, group = resource.split(".", 1)
        except ValueError:
            raise ValueError(f"scale target {text!r}: write <plural>.<group>/<name>, "
                             "e.g. kvflowpools.kvflow.dev/demo-decode") from None
        if group not in VERSIONS:
            raise ValueError(f"scale target {text!r}: group must be one of {', '.join(VERSIONS)}")
        return cls(group, plural, name, namespace)

    def scale_path(self) -> str:
        api_version = f"{self.group}/{VERSIONS[self.group]}"
        return resource_path(api_version, self.plural, self.namespace, self.name, "scale")


def scale_request(target: ScaleTarget, replicas: int) -> ApiRequest:
    """The PATCH of the scale subresource that sets `spec.replicas`."""
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    return ApiRequest("PATCH", target.scale_path(), {"spec": {"replicas": replicas}}, MERGE_PATCH)


def read_scale_request(target: ScaleTarget) -> ApiRequest:
    return ApiRequest("GET", target.scale_path())


async def set_replicas(client: KubeClient, target: ScaleTarget, replicas: int) -> int:
    """Ask for `replicas`; returns what the API server now holds in the Scale's spec."""
    scale = await client.send(scale_request(target, replicas))
    return int(scale.get("spec", {}).get("replicas", 0))


async def get_replicas(client: KubeClient, target: ScaleTarget) -> tuple[int, int]:
    """(desired, current) replicas from the scale subresource."""
    scale = await client.send(read_scale_request(target))
    return int(scale.get("spec", {}).get("replicas", 0)), int(scale.get("status", {}).get("replicas", 0))
