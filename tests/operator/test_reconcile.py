"""The pure reconcile step: golden output per shape, schema-valid objects, owners, labels, pool seeding."""

from __future__ import annotations

import os

import msgspec
import pytest

from kvflow.cli.frontend import build_parser as frontend_parser
from kvflow.engines.worker import parse_args as worker_args
from kvflow.operator.manifests import to_yaml
from kvflow.operator.objects import LABEL_INSTANCE, LABEL_MANAGED_BY
from kvflow.operator.reconcile import (
    SEEDED,
    Observed,
    ObservedPool,
    desired_state,
    object_key,
    observe,
    stale,
)
from kvflow.runtime.config import RuntimeConfig, load_config
from kvflow.testing.k8s import GOLDEN, SHAPES, example_resource, validate


def render(shape: str) -> str:
    desired = desired_state(example_resource(shape))
    return to_yaml([*desired.objects, *desired.seeds])


@pytest.mark.parametrize("shape", SHAPES)
def test_golden(shape: str) -> None:
    path = GOLDEN / f"{shape}.yaml"
    if os.environ.get("KVFLOW_UPDATE_GOLDEN"):
        path.write_text(render(shape))
    assert render(shape) == path.read_text(), f"{path.name} differs (KVFLOW_UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("owned", [True, False])
def test_every_object_validates_against_the_kubernetes_schemas(shape: str, owned: bool) -> None:
    desired = desired_state(example_resource(shape), owned=owned)
    pools = {o["metadata"]["name"]: o for o in desired.objects if o["kind"] == "KvflowPool"}
    # A seed is a partial apply: the server validates it merged into the pool.
    merged = [{**pools[s["metadata"]["name"]], "spec": {**pools[s["metadata"]["name"]]["spec"], **s["spec"]}}
              for s in desired.seeds]
    used = {validate(obj) for obj in [*desired.objects, *merged]}
    assert "1.33" in used
    assert ("crd" in used) == owned  # KvflowPools exist only under the operator


@pytest.mark.parametrize("shape", SHAPES)
def test_owned_objects_point_at_the_cr_and_carry_labels(shape: str) -> None:
    resource = example_resource(shape)
    for obj in desired_state(resource).objects:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "KvflowDeployment", resource.name, resource.uid, True)
        assert obj["metadata"]["labels"][LABEL_INSTANCE] == resource.name
        assert obj["metadata"]["namespace"] == resource.namespace
    for obj in desired_state(resource, owned=False).objects:
        assert "ownerReferences" not in obj["metadata"]
        assert obj["metadata"]["labels"][LABEL_MANAGED_BY] == "kvflow-manifests"


def test_same_input_same_output() -> None:
    resource = example_resource("planner")
    assert desired_state(resource) == desired_state(example_resource("planner"))


def kinds(shape: str) -> list[str]:
    return [f"{o['kind']}/{o['metadata']['name']}" for o in desired_state(example_resource(shape)).objects]


def test_shapes_have_the_right_parts() -> None:
    agg, disagg, sla = kinds("aggregated"), kinds("disaggregated"), kinds("planner")
    assert "KvflowPool/tiny-agg-aggregated" in agg and "Deployment/tiny-agg-aggregated" in agg
    assert "StatefulSet/tiny-agg-etcd" in agg and "StatefulSet/tiny-agg-nats" in agg
    assert {"Deployment/llama-disagg-prefill", "Deployment/llama-disagg-decode"} <= set(disagg)
    assert not any("planner" in k for k in disagg)
    assert {"Deployment/llama-sla-planner", "Role/llama-sla-planner"} <= set(sla)
    assert not any(k.startswith("StatefulSet/") for k in sla)  # external etcd and NATS


def containers(shape: str) -> dict[str, dict]:
    objs = desired_state(example_resource(shape)).objects
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0]
            for o in objs if o["kind"] == "Deployment"}


def test_worker_commands_carry_the_role_and_engine() -> None:
    pods = containers("disaggregated")
    prefill, decode = pods["llama-disagg-prefill"]["command"], pods["llama-disagg-decode"]["command"]
    assert prefill[:4] == ["kvflow", "worker", "--role", "prefill"]
    assert decode[:4] == ["kvflow", "worker", "--role", "decode"]
    assert "/models/Llama-3.1-8B-Instruct" in decode
    assert pods["llama-disagg-decode"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in pods["llama-disagg-decode"]["env"]


def test_aggregated_and_frontend_commands_parse_with_the_real_cli() -> None:
    pods = containers("aggregated")
    worker = worker_args(pods["tiny-agg-aggregated"]["command"][2:])
    assert (worker.engine, worker.model_path, worker.model_name) == ("mocker", "/models/tiny", "tiny")
    frontend = frontend_parser().parse_args(pods["tiny-agg-frontend"]["command"][2:])
    assert (frontend.http_host, frontend.http_port, frontend.router_mode) == ("0.0.0.0", 8000, "kv")


@pytest.mark.parametrize("shape", SHAPES)
def test_runtime_configmap_is_read_by_the_runtime_config(shape: str) -> None:
    objs = desired_state(example_resource(shape)).objects
    env = next(o for o in objs if o["kind"] == "ConfigMap")["data"]
    config = load_config(RuntimeConfig, "runtime", env={**env, "KVFLOW_ADVERTISE_HOST": "10.0.0.7"})
    assert (config.discovery, config.event_plane, config.system_port) == ("etcd", "nats", 9090)
    assert config.etcd_endpoints.startswith("http://") and config.nats_url.startswith("nats://")


def pool_replicas(observed: Observed) -> tuple[int, list]:
    desired = desired_state(example_resource("aggregated"), observed)
    dep = next(o for o in desired.objects if o["metadata"]["name"] == "tiny-agg-aggregated"
               and o["kind"] == "Deployment")
    return dep["spec"]["replicas"], list(desired.seeds)


def test_cr_replicas_seed_the_pool_then_the_pool_rules() -> None:
    replicas, seeds = pool_replicas(Observed())
    assert replicas == 2 and seeds[0]["spec"] == {"replicas": 2}
    assert seeds[0]["metadata"]["annotations"] == {SEEDED: "2"}
    scaled = Observed(pools={"tiny-agg-aggregated": ObservedPool(replicas=5, seeded=2)})
    assert pool_replicas(scaled) == (5, [])  # the planner scaled the pool to 5: it stays 5


def test_editing_the_cr_replicas_reseeds() -> None:
    edited = Observed(pools={"tiny-agg-aggregated": ObservedPool(replicas=5, seeded=3)})
    replicas, seeds = pool_replicas(edited)
    assert replicas == 2 and seeds[0]["spec"]["replicas"] == 2


def test_observe_reads_pools_and_objects() -> None:
    pool = {"kind": "KvflowPool", "metadata": {"name": "p", "annotations": {SEEDED: "3"}},
            "spec": {"replicas": 4}}
    dep = {"kind": "Deployment", "metadata": {"name": "d"}}
    got = observe([pool], [dep])
    assert got.pools == {"p": ObservedPool(4, 3)}
    assert got.objects == {"KvflowPool/p": pool, "Deployment/d": dep}


def test_objects_no_longer_wanted_are_stale() -> None:
    with_planner = example_resource("planner")
    made = desired_state(with_planner).objects
    off = msgspec.structs.replace(with_planner, spec=msgspec.structs.replace(
        with_planner.spec, planner=msgspec.structs.replace(with_planner.spec.planner, enabled=False)))
    foreign = {"kind": "ConfigMap", "metadata": {"name": "mine", "ownerReferences": [{"uid": "other"}]}}
    observed = observe([], [*made, foreign])
    gone = stale(off, desired_state(off, observed), observed)
    assert sorted(object_key(o) for o in gone) == [
        "Deployment/llama-sla-planner", "Role/llama-sla-planner", "RoleBinding/llama-sla-planner",
        "ServiceAccount/llama-sla-planner"]
    assert stale(with_planner, desired_state(with_planner, observed), observed) == []
