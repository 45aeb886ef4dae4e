"""The operator's API side against a scripted loopback API: SSA requests, status, scale, lease, kopf handlers.

There is no Kubernetes API server here: `ScriptedApi` answers like one for the
few calls made (see its docstring for what it does not do).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt

import kopf
import pytest

from kvflow.operator import handlers
from kvflow.operator.apply import reconcile_once
from kvflow.operator.lease import LeaseHolder, lease_step
from kvflow.operator.reconcile import FIELD_MANAGER, SEED_MANAGER
from kvflow.planner.kubernetes import ScaleTarget, get_replicas, scale_request, set_replicas
from kvflow.runtime.kube import APPLY_PATCH, MERGE_PATCH, KubeClient, KubeConfig, resource_path
from kvflow.testing.k8s import example
from kvflow.testing.k8s_api import ScriptedApi

CR_PATH = "/apis/kvflow.dev/v1alpha1/namespaces/default/kvflowdeployments/tiny-agg"
DEP_PATH = "/apis/apps/v1/namespaces/default/deployments"
POOL_PATH = "/apis/kvflow.dev/v1alpha1/namespaces/default/kvflowpools/tiny-agg-aggregated"


@pytest.fixture
async def api():
    server = ScriptedApi()
    await server.start()
    client = KubeClient(KubeConfig(server.url))
    yield server, client
    await client.close()
    await server.stop()


def stored_cr(server: ScriptedApi) -> dict:
    cr = example("aggregated")
    cr["metadata"].update(namespace="default", uid="uid-1", generation=1)
    return server.store(CR_PATH, cr)


def play_controllers(server: ScriptedApi) -> None:
    """What the Deployment / StatefulSet controllers would do: roll every workload out."""
    for key, obj in server.objects.items():
        if "/deployments/" in key or "/statefulsets/" in key:
            n = obj["spec"]["replicas"]
            obj["metadata"]["generation"] = 1
            obj["status"] = {"observedGeneration": 1, "replicas": n, "updatedReplicas": n,
                             "readyReplicas": n, "availableReplicas": n,
                             "currentRevision": "a", "updateRevision": "a"}


async def test_reconcile_applies_server_side_and_is_idempotent(api) -> None:
    server, client = api
    status = await reconcile_once(client, stored_cr(server))
    applies = [r for r in server.requests if r.content_type == APPLY_PATCH]
    managers = [r.query["fieldManager"] for r in applies]
    assert managers.count(SEED_MANAGER) == 1 and managers.count(FIELD_MANAGER) == len(applies) - 1
    assert all(r.method == "PATCH" and r.query["force"] == "true" for r in applies)
    assert status["conditions"][0]["status"] == "False"
    assert server.objects[CR_PATH]["status"]["conditions"][0]["reason"] == "Waiting"
    first = [(r.path, r.body) for r in applies if r.query["fieldManager"] == FIELD_MANAGER]

    server.requests.clear()
    await reconcile_once(client, server.objects[CR_PATH])
    again = [(r.path, r.body) for r in server.requests if r.content_type == APPLY_PATCH]
    assert again == first  # same objects, and no re-seed: the pool remembers its seed


async def test_ready_only_after_every_workload_rolled_out(api) -> None:
    server, client = api
    await reconcile_once(client, stored_cr(server))
    play_controllers(server)
    status = await reconcile_once(client, server.objects[CR_PATH])
    assert status["conditions"][0]["status"] == "True", status
    assert server.objects[POOL_PATH]["status"] == {
        "replicas": 2, "readyReplicas": 2,
        "selector": "app.kubernetes.io/component=worker,app.kubernetes.io/instance=tiny-agg,"
                    "app.kubernetes.io/name=kvflow,kvflow.dev/pool=aggregated"}


async def test_planner_scales_a_pool_and_the_deployment_follows(api) -> None:
    server, client = api
    await reconcile_once(client, stored_cr(server))
    target = ScaleTarget.parse("kvflowpools.kvflow.dev/tiny-agg-aggregated", "default")
    assert await set_replicas(client, target, 5) == 5
    assert (await get_replicas(client, target))[0] == 5
    await reconcile_once(client, server.objects[CR_PATH])
    assert server.objects[f"{DEP_PATH}/tiny-agg-aggregated"]["spec"]["replicas"] == 5
    assert server.objects[POOL_PATH]["spec"]["replicas"] == 5  # no re-seed over the planner


def test_scale_request_is_a_merge_patch_of_the_scale_subresource() -> None:
    req = scale_request(ScaleTarget.parse("kvflowpools.kvflow.dev/demo-decode", "llm"), 3)
    assert (req.method, req.content_type) == ("PATCH", MERGE_PATCH)
    assert req.path == "/apis/kvflow.dev/v1alpha1/namespaces/llm/kvflowpools/demo-decode/scale"
    assert req.body == {"spec": {"replicas": 3}}
    plain = scale_request(ScaleTarget.parse("deployments.apps/demo-decode", "llm"), 0)
    assert plain.path == "/apis/apps/v1/namespaces/llm/deployments/demo-decode/scale"
    with pytest.raises(ValueError, match="plural"):
        ScaleTarget.parse("demo-decode", "llm")


async def test_turning_the_planner_off_deletes_what_it_needed(api) -> None:
    server, client = api
    cr = example("planner")
    cr["metadata"].update(namespace="default", uid="uid-9", generation=1)
    path = CR_PATH.replace("tiny-agg", "llama-sla")
    await reconcile_once(client, server.store(path, cr))
    assert f"{DEP_PATH}/llama-sla-planner" in server.objects
    off = copy.deepcopy(server.objects[path])
    off["spec"]["planner"]["enabled"] = False
    server.requests.clear()
    await reconcile_once(client, server.store(path, off))
    deleted = sorted(r.path.rsplit("/", 2)[-2] for r in server.requests if r.method == "DELETE")
    assert deleted == ["deployments", "rolebindings", "roles", "serviceaccounts"]
    assert f"{DEP_PATH}/llama-sla-planner" not in server.objects
    assert f"{DEP_PATH}/llama-sla-decode" in server.objects


async def test_invalid_spec_is_reported_in_status(api) -> None:
    server, client = api
    cr = stored_cr(server)
    cr["spec"]["pools"] = [{"role": "decode"}]
    status = await reconcile_once(client, cr)
    assert status["conditions"][0]["reason"] == "InvalidSpec" and "prefill" in status["error"]
    assert not any(r.content_type == APPLY_PATCH for r in server.requests)


def test_lease_step_decisions() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    args = {"namespace": "ns", "name": "op", "duration_s": 15, "now": now}
    created = lease_step(None, me="a", **args)
    assert created.action == "create" and created.request.method == "POST"
    lease = {**created.request.body, "metadata": {"name": "op", "namespace": "ns", "resourceVersion": "7"}}
    assert lease_step(lease, me="a", **args).action == "renew"
    assert lease_step(lease, me="b", **args).action == "wait"
    later = {**args, "now": now + dt.timedelta(seconds=16)}
    took = lease_step(lease, me="b", **later)
    assert took.action == "take" and took.request.method == "PUT"
    assert took.request.body["metadata"]["resourceVersion"] == "7"  # optimistic concurrency
    assert took.request.body["spec"]["leaseTransitions"] == 1


async def test_two_candidates_one_leader(api) -> None:
    server, client = api
    a = LeaseHolder(client, "kvflow-system", "kvflow-operator", "a")
    b = LeaseHolder(client, "kvflow-system", "kvflow-operator", "b")
    assert await a.attempt() == "create"
    assert await b.attempt() == "wait"
    assert await a.attempt() == "renew"
    path = resource_path("coordination.k8s.io/v1", "Lease", "kvflow-system", "kvflow-operator")
    server.objects[path]["spec"]["renewTime"] = "2000-01-01T00:00:00.000000Z"  # a stopped renewing
    assert await b.attempt() == "take"
    assert await a.attempt() == "wait"


async def test_kopf_handlers_reconcile_through_the_same_function(api) -> None:
    server, client = api
    memo = handlers.Memo(KubeConfig(server.url), client)
    await handlers.on_change(body=kopf.Body(stored_cr(server)), memo=memo)
    assert f"{DEP_PATH}/tiny-agg-frontend" in server.objects
    server.objects[POOL_PATH]["spec"]["replicas"] = 3  # scaled via its scale subresource
    await handlers.on_pool_scaled(body=kopf.Body(server.objects[POOL_PATH]), memo=memo)
    assert server.objects[f"{DEP_PATH}/tiny-agg-aggregated"]["spec"]["replicas"] == 3


def test_kopf_login_uses_the_configured_server() -> None:
    info = handlers.login(memo=handlers.Memo(KubeConfig("https://10.0.0.1:6443", token="t")))
    assert (info.server, info.token, info.scheme) == ("https://10.0.0.1:6443", "t", "Bearer")


async def test_kopf_startup_keeps_its_bookkeeping_in_annotations(api) -> None:
    server, _ = api
    settings, memo = kopf.OperatorSettings(), handlers.Memo(KubeConfig(server.url))
    await handlers.configure(settings=settings, memo=memo)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert memo.client is not None
    await handlers.close(memo=memo)


async def wait_for(check, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def replicas_of(server: ScriptedApi, name: str) -> int | None:
    obj = server.objects.get(f"{DEP_PATH}/{name}")
    return None if obj is None else obj["spec"]["replicas"]


async def test_kopf_operator_with_lease_reconciles_follows_scale_and_stops_when_lease_is_lost(api) -> None:
    """kopf's own machinery (discovery, list, watch, handlers) against the scripted API."""
    server, client = api
    stored_cr(server)
    run = asyncio.create_task(handlers.run_operator(
        KubeConfig(server.url), namespaces=(), lease_namespace="kvflow-system",
        lease_name="kvflow-operator", identity="op-a", lease_duration_s=3))
    try:
        await wait_for(lambda: replicas_of(server, "tiny-agg-aggregated") == 2)
        target = ScaleTarget.parse("kvflowpools.kvflow.dev/tiny-agg-aggregated", "default")
        await set_replicas(client, target, 4)  # the planner's call; kopf's pool handler reacts
        await wait_for(lambda: replicas_of(server, "tiny-agg-aggregated") == 4)
        lease = resource_path("coordination.k8s.io/v1", "Lease", "kvflow-system", "kvflow-operator")
        assert server.objects[lease]["spec"]["holderIdentity"] == "op-a"
        taken = copy.deepcopy(server.objects[lease])
        taken["spec"].update(holderIdentity="op-b", renewTime="2999-01-01T00:00:00.000000Z")
        server.store(lease, taken)
        assert await asyncio.wait_for(run, 20) == 1  # another holder: this one steps down
    finally:
        run.cancel()


async def test_the_planner_kubernetes_connector_scales_pools(api) -> None:
    from kvflow.planner.connectors import make_connector
    from kvflow.planner.model import Fleet

    server, client = api
    await reconcile_once(client, stored_cr(server))
    connector = make_connector("kubernetes", targets="aggregated=kvflowpools.kvflow.dev/tiny-agg-aggregated",
                               namespace="default", api_server=server.url)
    await asyncio.to_thread(connector.apply, Fleet(aggregated=4))
    assert server.objects[POOL_PATH]["spec"]["replicas"] == 4
    assert await asyncio.to_thread(connector.current) == Fleet(aggregated=4)
    with pytest.raises(ValueError, match="no prefill pool"):
        await asyncio.to_thread(connector.apply, Fleet(prefill=1, decode=1))
    with pytest.raises(ValueError, match="ROLE=<plural>"):
        make_connector("kubernetes", targets="workers=deployments.apps/x")
