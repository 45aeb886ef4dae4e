"""Cluster fixtures: a rig of network-namespace hosts with etcd + NATS, a frontend and workers."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest

from kvflow.testing import netns
from kvflow.testing.cluster import Cluster
from kvflow.testing.procs import Proc
from kvflow.testing.tokenizer import make_model_dir

T = TypeVar("T")
MODEL = "m"
HTTP_PORT = 8000
pytestmark = pytest.mark.cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("cluster-model") / "tiny")


class Rig:
    """A Cluster with the usual roles: infra (etcd, NATS), front, worker hosts, client."""

    def __init__(self, cluster: Cluster, model_dir: Path) -> None:
        self.c = cluster
        self.model_dir = model_dir
        self.etcd, self.nats = cluster.infra("infra")
        self.url = ""

    def frontend(self, *args: str) -> str:
        host = self.c.hosts["front"]
        proc = self.c.start("front", "frontend", "--http-host", host.addr, "--http-port",
                            str(HTTP_PORT), *args, name="frontend")
        proc.wait_for_output("frontend: listening on", timeout=60)
        self.url = f"http://{host.addr}:{HTTP_PORT}"
        return self.url

    def worker(self, host: str, *args: str, speedup: float = 2.0, **settings: object) -> Proc:
        return self.c.start(host, "worker", "--engine", "mocker", "--model-path", str(self.model_dir),
                            "--model-name", MODEL, "--speedup-ratio", str(speedup), "--block-size", "4",
                            *args, name="worker", **settings)

    def get(self, path: str) -> tuple[int, bytes]:
        """GET on the frontend, from the client host."""
        def fetch() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(self.url + path, timeout=3) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()
            except OSError as exc:
                return 0, str(exc).encode()
        return self.c.call("client", fetch, timeout=10)

    def route_overlap(self, prompt: str) -> int:
        """KV blocks of `prompt` the frontend's router knows are cached on its pick (/debug/route)."""
        body = json.dumps({"model": MODEL, "prompt": prompt}).encode()

        def post() -> int:
            req = urllib.request.Request(self.url + "/debug/route", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                return int(json.loads(resp.read())["overlap_blocks"])
        return self.c.call("client", post, timeout=10)

    def live_workers(self) -> int:
        status, body = self.get("/health")
        if status not in (200, 503):
            return -1
        return int(json.loads(body)["models"].get(MODEL, 0))

    def metric(self, name: str) -> float:
        _, body = self.get("/metrics")
        found = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body.decode(), re.MULTILINE)
        return sum(float(v) for v in found)

    async def wait_workers(self, n: int, timeout: float = 40.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (seen := await asyncio.to_thread(self.live_workers)) != n:
            if loop.time() > deadline:
                raise TimeoutError(f"frontend sees {seen} workers, wanted {n}")
            await asyncio.sleep(0.2)

    async def client(self, fn: Callable[[openai.AsyncOpenAI], Awaitable[T]], timeout: float = 120) -> T:
        """Run `fn(client)` with an openai client whose connections start on the client host."""
        async def main() -> T:
            client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                                        timeout=60)
            try:
                return await fn(client)
            finally:
                await client.close()
        return await asyncio.to_thread(self.c.call, "client", lambda: asyncio.run(main()), timeout)

    @staticmethod
    async def stream(client: openai.AsyncOpenAI, prompt: str, max_tokens: int,
                 on_chunk: Callable[[int], Any] | None = None) -> tuple[str, str | None, int, int]:
        """Stream one completion: (text, finish_reason, completion tokens, cached prompt tokens)."""
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        pieces: list[str] = []
        finish, tokens, cached = None, 0, 0
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
                if on_chunk is not None:
                    on_chunk(len(pieces))
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                cached = (details.cached_tokens or 0) if details else 0
        return "".join(pieces), finish, tokens, cached


@pytest.fixture
def rig(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[Rig]:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = Cluster(["infra", "front", "w1", "w2", "client"])
    try:
        yield Rig(cluster, model_dir)
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(cluster.logs())
    finally:
        cluster.close()
