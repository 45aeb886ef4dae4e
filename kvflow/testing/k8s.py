"""Helpers for the operator tests: the example CRs, and schema validation of every generated object."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate

from kvflow.operator.crd import crds
from kvflow.operator.manifests import load_yaml
from kvflow.operator.spec import Resource, parse_resource

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples"
GOLDEN = ROOT / "tests" / "operator" / "golden"
K8S_VERSION = "1.33.0"  # the Kubernetes OpenAPI schemas objects are checked against (strict)
SHAPES = ("aggregated", "disaggregated", "planner")


def example(shape: str) -> dict:
    return load_yaml((EXAMPLES / f"{shape}.yaml").read_text())[0]


def example_resource(shape: str, uid: str = "3f1c6a2e-0000-4000-8000-000000000001",
                     generation: int = 1) -> Resource:
    cr = example(shape)
    cr["metadata"].update(uid=uid, generation=generation)
    return parse_resource(cr)


def crd_schema(kind: str) -> dict:
    crd = next(c for c in crds() if c["spec"]["names"]["kind"] == kind)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(obj: dict) -> str:
    """Validate against Kubernetes' own schema, or our CRD's for our kinds; returns what was used."""
    if obj["apiVersion"].startswith("kvflow.dev/"):
        jsonschema.Draft4Validator(crd_schema(obj["kind"])).validate(obj)
        return "crd"
    return kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
