"""The CRDs: valid CustomResourceDefinitions, structural schemas, small, and agreeing with spec.py."""

from __future__ import annotations

import json

import jsonschema
import pytest

from kvflow.operator.crd import crds
from kvflow.operator.spec import SpecError, parse_spec
from kvflow.testing.k8s import SHAPES, crd_schema, example, validate

ALLOWED_UNTYPED = ("x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string")
FORBIDDEN = ("$ref", "additionalItems", "patternProperties", "dependencies", "definitions", "id", "$schema")


def structural_problems(node: dict, path: str = "") -> list[str]:
    """The rules of a structural schema (Kubernetes docs, 'Specifying a structural schema')."""
    problems = []
    if "type" not in node and not any(node.get(k) for k in ALLOWED_UNTYPED):
        problems.append(f"{path or '/'}: no type")
    problems += [f"{path}: {k} is not allowed" for k in FORBIDDEN if k in node]
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    for name, child in node.get("properties", {}).items():
        problems += structural_problems(child, f"{path}/{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += structural_problems(node[key], f"{path}/{key}")
    return problems


@pytest.mark.parametrize("crd", crds(), ids=lambda c: c["metadata"]["name"])
def test_crd_is_a_valid_structural_crd(crd: dict) -> None:
    assert validate(crd) == "1.33"
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert structural_problems(schema) == []
    jsonschema.Draft4Validator.check_schema(schema)
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}"


def test_crds_are_small() -> None:
    sizes = [len(json.dumps(c)) for c in crds()]
    assert max(sizes) < 32_000, sizes  # the limit for an object in etcd is ~1.5 MB; we stay far under


def test_pool_has_a_scale_subresource_for_the_planner_and_hpa() -> None:
    pool = next(c for c in crds() if c["spec"]["names"]["kind"] == "KvflowPool")
    sub = pool["spec"]["versions"][0]["subresources"]
    assert sub["scale"] == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector"}
    assert "status" in sub


@pytest.mark.parametrize("shape", SHAPES)
def test_examples_validate_against_the_crd(shape: str) -> None:
    validate(example(shape))


BAD = [
    ({"pools": [{"role": "oops"}]}, "role"),
    ({"pools": [{"role": "decode"}]}, "prefill"),
    ({"pools": [{"replicas": -1}]}, "replicas"),
    ({"frontend": {"routerMode": "fastest"}}, "routerMode"),
    ({"typo": 1}, "typo"),
    ({"pools": [{"replicas": "two"}]}, "replicas"),
]


@pytest.mark.parametrize(("patch", "word"), BAD)
def test_bad_specs_are_refused_with_a_clear_line(patch: dict, word: str) -> None:
    spec = {**example("aggregated")["spec"], **patch}
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert word in str(err.value) and "\n" not in str(err.value)


# Cross-field rules live in spec.py only; unknown fields the API server refuses through field
# validation (kubectl's default --validate=strict) or prunes, which a JSON schema check cannot show.
@pytest.mark.parametrize(("patch", "word"), [b for b in BAD if b[1] not in ("prefill", "typo")])
def test_the_api_server_schema_refuses_them_too(patch: dict, word: str) -> None:
    cr = example("aggregated")
    cr["spec"].update(patch)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(crd_schema("KvflowDeployment")).validate(cr)

