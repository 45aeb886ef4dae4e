"""Readiness: Ready only when every pod of the current generation is ready; rolling updates are not."""

from __future__ import annotations

import copy

from kvflow.operator.objects import SPEC_HASH
from kvflow.operator.reconcile import Observed, desired_state, object_key
from kvflow.operator.status import deployment_status, keep_transition_time, pool_status, workload_readiness
from kvflow.testing.k8s import example_resource


def desired():
    return desired_state(example_resource("aggregated"))


def as_running(obj: dict, **status: int) -> dict:
    """The object as the API would return it once its controller has rolled it out fully."""
    out = copy.deepcopy(obj)
    out["metadata"].update(generation=2)
    n = out["spec"]["replicas"]
    base = {"observedGeneration": 2, "replicas": n, "updatedReplicas": n, "readyReplicas": n,
            "availableReplicas": n}
    if obj["kind"] == "StatefulSet":
        base.update(currentRevision="r1", updateRevision="r1")
    out["status"] = {**base, **status}
    return out


def all_running(d) -> Observed:
    objs = [o for o in d.objects if o["kind"] in ("Deployment", "StatefulSet")]
    return Observed(objects={object_key(o): as_running(o) for o in objs})


def test_ready_when_every_workload_is_rolled_out() -> None:
    d = desired()
    status = deployment_status(7, d, all_running(d), "2026-01-01T00:00:00Z")
    (ready,) = status["conditions"]
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "AllPodsReady", 7)
    assert all(c["ready"] for c in status["components"].values())


def test_nothing_created_is_not_ready() -> None:
    status = deployment_status(1, desired(), Observed(), "t")
    assert status["conditions"][0]["status"] == "False"
    assert "not created yet" in status["conditions"][0]["message"]


def test_rolling_update_with_old_pods_serving_is_not_ready() -> None:
    dep = next(o for o in desired().objects if o["kind"] == "Deployment")
    n = dep["spec"]["replicas"]
    # Surge: n new pods ready, one old pod still running.
    got = workload_readiness(dep, as_running(dep, replicas=n + 1, updatedReplicas=n))
    assert not got.ready and "total" in got.reason
    # Every pod ready, but only part of them are of the new template.
    got = workload_readiness(dep, as_running(dep, updatedReplicas=n - 1))
    assert not got.ready


def test_an_older_spec_on_the_server_is_not_ready_even_if_all_pods_are() -> None:
    dep = next(o for o in desired().objects if o["kind"] == "Deployment")
    stale = as_running(dep)
    stale["metadata"]["annotations"][SPEC_HASH] = "0000000000000000"
    assert workload_readiness(dep, stale).reason == "the latest spec is not applied yet"


def test_unobserved_generation_is_not_ready() -> None:
    dep = next(o for o in desired().objects if o["kind"] == "Deployment")
    got = workload_readiness(dep, as_running(dep, observedGeneration=1))
    assert not got.ready and "generation" in got.reason


def test_statefulset_mid_update_is_not_ready() -> None:
    sts = next(o for o in desired().objects if o["kind"] == "StatefulSet")
    got = workload_readiness(sts, as_running(sts, updateRevision="r2"))
    assert not got.ready and "rolling" in got.reason


def test_transition_time_kept_while_status_is_unchanged() -> None:
    d = desired()
    first = deployment_status(1, d, Observed(), "T1")
    second = keep_transition_time(deployment_status(1, d, Observed(), "T2"), first)
    assert second["conditions"][0]["lastTransitionTime"] == "T1"
    flipped = keep_transition_time(deployment_status(1, d, all_running(d), "T3"), second)
    assert flipped["conditions"][0]["lastTransitionTime"] == "T3"


def test_pool_status_reports_what_the_scale_subresource_needs() -> None:
    got = pool_status({"b": "2", "a": "1"}, {"status": {"replicas": 3, "readyReplicas": 2}})
    assert got == {"replicas": 3, "readyReplicas": 2, "selector": "a=1,b=2"}
