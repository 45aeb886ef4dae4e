"""Start kvflow commands as child processes: `kvflow run`'s workers and the planner's local connector.

A child gets the parent's environment plus the runtime settings it must share with the
parent (discovery, namespace, planes), so it finds the same peers. On Linux a child
started with `die_with_parent` gets SIGTERM when its parent dies, even by SIGKILL, so
no worker outlives the command that started it. `stop` ends children gracefully
(SIGTERM: a worker leaves discovery, finishes its streams, exits), then kills stragglers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from kvflow.runtime.config import CONFIG_FILE_ENV, RuntimeConfig

SHARED_SETTINGS = ("discovery", "discovery_path", "namespace", "event_plane", "etcd_endpoints",
                   "nats_url", "otlp_endpoint")


def child_env(config: RuntimeConfig | None = None, config_file: str | None = None,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with `config`'s shared settings as KVFLOW_*."""
    env = dict(os.environ if base is None else base)
    if config is not None:
        env.update({f"KVFLOW_{name.upper()}": str(getattr(config, name)) for name in SHARED_SETTINGS})
    if config_file:
        env[CONFIG_FILE_ENV] = config_file  # the child reads its own section of the file
    return env


def _die_with_parent() -> None:
    """In the child: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def launch(command: str, args: Sequence[str], env: Mapping[str, str], *,
           log_path: str | Path | None = None, die_with_parent: bool = True,
           new_session: bool = False) -> subprocess.Popen:
    """`python -m kvflow.cli.main COMMAND ARGS`; output to `log_path` (else inherited)."""
    argv = [sys.executable, "-m", "kvflow.cli.main", command, *args]
    preexec = _die_with_parent if die_with_parent and sys.platform == "linux" else None
    if log_path is None:
        return subprocess.Popen(argv, env=dict(env), preexec_fn=preexec, start_new_session=new_session)
    with open(log_path, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=preexec, start_new_session=new_session)


def stop(procs: Iterable[subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM every live child, wait up to `timeout` for each, then SIGKILL what is left."""
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        proc.terminate()
    for proc in live:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
