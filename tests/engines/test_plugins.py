"""Engines as entry-point plugins, the adapter glue in the worker, and the worker's KV-event self-check."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.util
import logging
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import tomllib

from kvflow.engines.base import ENGINES, EngineSpec, engine_names, get_engine
from kvflow.engines.selfcheck import BlockSizeMismatchError
from kvflow.engines.worker import LoadGauges, parse_args, serve_instance, worker_args
from kvflow.llm.protocol import PreprocessedRequest, StopConditions
from kvflow.runtime import DistributedRuntime, RuntimeConfig
from kvflow.testing.procs import kvflow_proc, runtime_env
from kvflow.testing.tokenizer import make_model_dir

ROOT = Path(__file__).resolve().parents[2]

DEMO = '''
"""A third-party engine for tests: echoes, and promises KV events it never publishes."""
import asyncio
from kvflow.engines.adapter import EngineAdapter, EngineInfo, adapter_spec
from kvflow.llm.protocol import EngineOutput

ABORTED = []


class Demo(EngineAdapter):
    name = "demo"

    @classmethod
    def add_args(cls, parser):
        parser.add_argument("--demo-block-size", type=int, default=16)

    @classmethod
    def from_args(cls, ns, hooks):
        engine = cls(hooks)
        engine.block = ns.demo_block_size
        return engine

    async def start_engine(self):
        return EngineInfo(256, self.block, 100, 4, True)

    async def generate(self, request, context):
        for token in request.token_ids[: request.stop.max_tokens]:
            await asyncio.sleep(0.01)
            yield EngineOutput([token])
        yield EngineOutput(finish_reason="length")

    async def abort(self, request_id):
        ABORTED.append(request_id)

    async def cleanup(self):
        return None

    def events_hint(self):
        return "the demo engine never publishes by design"


SPEC = adapter_spec(Demo)
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A third-party distribution on disk: a module and a dist-info naming its entry point."""
    root = tmp_path_factory.mktemp("site")
    (root / "kvflow_demo_engine.py").write_text(textwrap.dedent(DEMO))
    info = root / "kvflow_demo_engine-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvflow-demo-engine\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kvflow.engines]\ndemo = kvflow_demo_engine:SPEC\n")
    return root


@pytest.fixture
def demo(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield importlib.import_module("kvflow_demo_engine")
    ENGINES.discard("demo")  # gone with its sys.path entry, for the tests that follow


def test_a_third_party_engine_is_found_by_its_entry_point(demo) -> None:
    assert {"demo", "echo", "mocker"} <= set(engine_names())
    assert get_engine("demo") is demo.SPEC
    ns = parse_args(["--engine", "demo", "--model-path", "m", "--demo-block-size", "8"])
    assert ns.demo_block_size == 8


def test_pyproject_registers_the_builtins_as_entry_points() -> None:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["kvflow.engines"]
    assert {"echo", "mocker", "native"} <= set(table)
    for name in ("echo", "mocker"):
        module, attr = table[name].split(":")
        assert getattr(importlib.import_module(module), attr) is get_engine(name)


def test_the_plugin_runs_in_a_worker_process(plugin_dir: Path) -> None:
    env = {"PYTHONPATH": f"{ROOT}:{plugin_dir}", "PATH": "/usr/bin:/bin"}
    code = "import sys; from kvflow.cli.main import main; sys.exit(main())"
    out = subprocess.run(
        [sys.executable, "-c", code, "worker", "--engine", "demo", "--help"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--demo-block-size" in out.stdout


async def _serve(spec: EngineSpec, model: Path, *flags: str):
    """A worker instance in this process, a caller runtime, and the instance id."""
    cfg = RuntimeConfig(discovery="memory", event_plane="inproc")
    worker, caller = await DistributedRuntime(cfg).start(), await DistributedRuntime(cfg).start()
    ns = parse_args(["--engine", spec.name, "--model-path", str(model), *flags])
    gauges = LoadGauges(worker.metrics_registry)
    task = asyncio.ensure_future(serve_instance(worker, spec, ns, worker_args(ns), worker.lease_id, gauges))
    client = await caller.namespace(cfg.namespace).component("backend").endpoint("generate").client()
    await client.wait_for_instances(timeout=10)
    return worker, caller, task, client


async def _stop(*parts) -> None:
    worker, caller, task, _ = parts
    for rt in (caller, worker):
        await rt.shutdown()
    await asyncio.wait_for(task, 10)


def _missing(worker: DistributedRuntime) -> float | None:
    return worker.metrics_registry.get_sample_value(
        "kvflow_worker_missing_kv_events", {"worker_id": f"{worker.lease_id:x}"}
    )


def _request(rid: str, n: int) -> PreprocessedRequest:
    return PreprocessedRequest(rid, list(range(3, 23)), stop=StopConditions(max_tokens=n))


async def test_self_check_warns_when_promised_events_never_arrive(
    demo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parts = await _serve(demo.SPEC, make_model_dir(tmp_path / "m"), "--kv-events-check-timeout", "0.3")
    caplog.set_level(logging.WARNING, logger="kvflow.engines.selfcheck")
    outs = [o async for o in parts[3].round_robin(_request("w", 3))]
    assert outs[-1]["finish_reason"] == "length"
    for _ in range(100):
        if _missing(parts[0]) == 1:
            break
        await asyncio.sleep(0.05)
    assert _missing(parts[0]) == 1
    assert "KV EVENTS MISSING" in caplog.text and "never publishes by design" in caplog.text
    await _stop(*parts)


async def test_self_check_is_quiet_when_events_arrive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flags = ("--block-size", "4", "--speedup-ratio", "1000", "--kv-events-check-timeout", "5")
    parts = await _serve(get_engine("mocker"), make_model_dir(tmp_path / "m"), *flags)
    [o async for o in parts[3].round_robin(_request("q", 3))]
    for _ in range(100):
        if _missing(parts[0]) == 0:
            break
        await asyncio.sleep(0.05)
    assert _missing(parts[0]) == 0
    assert "KV EVENTS MISSING" not in caplog.text
    await _stop(*parts)


async def test_a_dropped_stream_aborts_the_adapter_request(demo, tmp_path: Path) -> None:
    parts = await _serve(demo.SPEC, make_model_dir(tmp_path / "m"), "--kv-events-check-timeout", "0")
    stream = parts[3].round_robin(_request("drop", 15))
    await stream.__anext__()
    await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(100):
        if "drop" in demo.ABORTED:
            break
        await asyncio.sleep(0.05)
    assert "drop" in demo.ABORTED
    await _stop(*parts)


async def test_card_block_size_differing_from_the_engine_is_an_error(demo, tmp_path: Path) -> None:
    spec = dataclasses.replace(demo.SPEC, card_overrides=lambda ns: {"kv_cache_block_size": 16})
    cfg = RuntimeConfig(discovery="memory", event_plane="inproc")
    worker = await DistributedRuntime(cfg).start()
    ns = parse_args(["--engine", "demo", "--model-path", str(make_model_dir(tmp_path / "m")),
                     "--demo-block-size", "32"])
    with pytest.raises(BlockSizeMismatchError, match="32 tokens but the model card says 16"):
        await serve_instance(worker, spec, ns, worker_args(ns), worker.lease_id)
    await worker.shutdown()


async def test_worker_processes_self_check_over_zmq(plugin_dir: Path, tmp_path: Path) -> None:
    """Real worker processes on the zmq event plane: the mocker's events reach it, the demo's never do."""
    model = make_model_dir(tmp_path / "m")
    settings = {"discovery": "file", "event_plane": "zmq", "namespace": "sc" + uuid.uuid4().hex[:6],
                "file_poll_interval": 0.05}
    env = runtime_env(discovery_path=tmp_path / "d", **settings)
    env["PYTHONPATH"] = f"{ROOT}:{plugin_dir}"
    workers = {
        name: kvflow_proc("worker", "--engine", name, "--model-path", str(model), "--component", name,
                          "--model-name", name,
                          "--kv-events-check-timeout", "3", *flags, env=env, log_dir=tmp_path, name=name)
        for name, flags in (("mocker", ["--speedup-ratio", "1000", "--block-size", "4"]), ("demo", []))
    }
    cfg = RuntimeConfig(discovery_path=str(tmp_path / "d"), **settings)  # type: ignore[arg-type]
    caller = await DistributedRuntime(cfg).start()
    try:
        for name in workers:
            client = await caller.namespace(cfg.namespace).component(name).endpoint("generate").client()
            await client.wait_for_instances(timeout=60)
            assert [o async for o in client.round_robin(_request(name, 3))][-1]["finish_reason"] == "length"
        workers["demo"].wait_for_output("KV EVENTS MISSING", timeout=30)
        await asyncio.sleep(4)  # past the mocker's deadline too
        assert "KV EVENTS MISSING" not in workers["mocker"].output()
    finally:
        await caller.shutdown()
        for proc in workers.values():
            proc.stop()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_worker_without_vllm_says_how_to_get_it(tmp_path: Path) -> None:
    code = "import sys; from kvflow.cli.main import main; sys.exit(main())"
    out = subprocess.run(
        [sys.executable, "-c", code, "worker", "--engine", "vllm", "--model-path", str(tmp_path)],
        env=runtime_env(discovery="memory") | {"PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2  # a user error: one line, no traceback
    assert "dev.sh engine vllm" in out.stderr and "Traceback" not in out.stderr
