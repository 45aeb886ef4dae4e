"""The process launcher shared by `kvflow run` and the planner's local connector."""

from __future__ import annotations

import subprocess
import sys
import time

from kvflow.runtime import launcher
from kvflow.runtime.config import RuntimeConfig


def test_child_env_carries_the_shared_runtime_settings() -> None:
    config = RuntimeConfig(discovery="etcd", etcd_endpoints="http://10.0.0.1:2379", namespace="ns1")
    env = launcher.child_env(config, "/etc/kvflow.toml", base={"PATH": "/bin", "KEEP": "1"})
    assert env["KVFLOW_DISCOVERY"] == "etcd" and env["KVFLOW_ETCD_ENDPOINTS"] == "http://10.0.0.1:2379"
    assert env["KVFLOW_NAMESPACE"] == "ns1" and env["KVFLOW_CONFIG"] == "/etc/kvflow.toml"
    assert env["KEEP"] == "1" and "KVFLOW_TCP_PORT" not in env  # only what peers must share


def test_launch_runs_a_kvflow_command_and_logs_it(tmp_path) -> None:
    log = tmp_path / "version.log"
    proc = launcher.launch("--version", [], launcher.child_env(), log_path=log)
    assert proc.wait(60) == 0
    assert log.read_text().startswith("kvflow ")


def test_stop_terminates_then_kills_stragglers() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                                 "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    started = time.monotonic()
    launcher.stop([polite, stubborn], timeout=1.0)
    assert polite.returncode == -15 and stubborn.returncode == -9
    assert time.monotonic() - started < 10
    stubborn.stdout.close()
