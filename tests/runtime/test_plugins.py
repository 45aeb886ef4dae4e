"""Discovery backends, event planes and KV transfer backends from a third-party distribution's
entry points (a real dist-info on sys.path, read by importlib.metadata)."""

from __future__ import annotations

import asyncio
import importlib
import textwrap
from pathlib import Path

import pytest

from kvflow.engines.worker import parse_args
from kvflow.kv.transfer.backends import BACKENDS, backend_names, get_backend
from kvflow.runtime import DistributedRuntime, RuntimeConfig
from kvflow.runtime.config import ConfigError
from kvflow.runtime.discovery import DISCOVERY
from kvflow.runtime.events import EVENT_PLANES
from kvflow.runtime.plugins import PluginRegistry, UnknownPluginError

PLUGIN = '''
from kvflow.kv.transfer.backends import TcpBackend
from kvflow.runtime.discovery.file import FileDiscovery
from kvflow.runtime.events.inproc import InprocEventPlane

MADE = []


def make_discovery(config):
    MADE.append("discovery")
    return FileDiscovery(config.discovery_path, config.lease_ttl, config.file_poll_interval)


def make_event_plane(config, discovery):
    MADE.append("events")
    return InprocEventPlane()


class Relay(TcpBackend):
    name = "relay"


RELAY = Relay()
'''

ENTRY_POINTS = """\
[kvflow.discovery]
shelf = kvflow_demo_plugins:make_discovery

[kvflow.event_planes]
loop = kvflow_demo_plugins:make_event_plane

[kvflow.kv_transfer_backends]
relay = kvflow_demo_plugins:RELAY
broken = kvflow_demo_missing_dependency:BACKEND
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    (root / "kvflow_demo_plugins.py").write_text(textwrap.dedent(PLUGIN))
    (root / "kvflow_demo_missing_dependency.py").write_text("import a_package_not_installed\n")
    info = root / "kvflow_demo_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvflow-demo-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def demo(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield importlib.import_module("kvflow_demo_plugins")
    for registry, name in ((DISCOVERY, "shelf"), (EVENT_PLANES, "loop"), (BACKENDS, "relay")):
        registry.discard(name)  # gone with its sys.path entry, for the tests that follow


async def test_a_runtime_runs_on_plugin_discovery_and_event_plane(demo, tmp_path: Path) -> None:
    config = RuntimeConfig(discovery="shelf", event_plane="loop", discovery_path=str(tmp_path))
    server = await DistributedRuntime(config).start()
    caller = await DistributedRuntime(config).start()

    async def double(request: int, context):
        yield request * 2

    task = asyncio.ensure_future(server.endpoint("demo.plugins.gen").serve(double))
    client = await caller.endpoint("demo.plugins.gen").client()
    await client.wait_for_instances(timeout=10)
    assert [x async for x in client.round_robin(21)] == [42]
    assert demo.MADE.count("discovery") == 2 and demo.MADE.count("events") == 2
    assert any(tmp_path.iterdir())  # the plugin's file discovery really holds the lease
    for rt in (caller, server):
        await rt.shutdown()
    await task


def test_a_plugin_transfer_backend_is_chosen_by_name(demo) -> None:
    assert get_backend("relay") is demo.RELAY
    assert {"relay", "shm", "tcp"} <= set(backend_names())
    assert "broken" not in backend_names()  # its module needs a package that is missing
    ns = parse_args(["--engine", "mocker", "--model-path", "m",
                     "--kv-transfer-backends", "relay,tcp"])
    assert ns.kv_transfer_backends == "relay,tcp"


def test_unknown_names_say_what_is_known() -> None:
    with pytest.raises(ConfigError, match=r"discovery must be one of .*file.*memory"):
        RuntimeConfig(discovery="consul")
    with pytest.raises(UnknownPluginError, match="unknown discovery backend 'consul'; known: "):
        DISCOVERY.get("consul")
    registry: PluginRegistry[int] = PluginRegistry("number", "kvflow.test_numbers")
    registry.add("one", 1)
    registry.add("one", 1)  # the same object again: fine
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("one", 2)
    assert registry.names() == ["one"] and "one" in registry and "two" not in registry
