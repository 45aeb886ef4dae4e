"""Every flag of every command from the config file and KVFLOW_* variables, with one precedence."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.runtime.errors import ConfigError
from kvflow.runtime.flags import parse_layered
from kvflow.testing.procs import kvflow_proc

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _frontend_parser():
    from kvflow.cli.frontend import build_parser

    return build_parser()


def test_precedence_defaults_file_env_flags(tmp_path) -> None:
    cfg = tmp_path / "kvflow.toml"
    cfg.write_text('[frontend]\nhttp_port = 8031\nmax_inflight_per_model = 4\n[router]\nblock_size = 32\n'
                   '[runtime]\nnamespace = "fromfile"\n')
    ns = parse_layered(_frontend_parser(), ["--config", str(cfg)], env={})
    assert (ns.http_port, ns.max_inflight_per_model, ns.router_block_size, ns.namespace) == (
        8031, 4, 32, "fromfile")
    ns = parse_layered(_frontend_parser(), [], env={"KVFLOW_CONFIG": str(cfg), "KVFLOW_HTTP_PORT": "8032"})
    assert ns.http_port == 8032 and ns.max_inflight_per_model == 4
    ns = parse_layered(_frontend_parser(), ["--http-port", "8033"],
                       env={"KVFLOW_CONFIG": str(cfg), "KVFLOW_HTTP_PORT": "8032"})
    assert ns.http_port == 8033
    assert parse_layered(_frontend_parser(), [], env={}).http_port == 8000


def test_env_values_are_parsed_like_flags() -> None:
    ns = parse_layered(_frontend_parser(), [], env={
        "KVFLOW_API_KEY": "a,b", "KVFLOW_ROUTER_USE_KV_EVENTS": "false", "KVFLOW_ROUTER_MODE": "random"})
    assert ns.api_key == ["a", "b"] and ns.router_use_kv_events is False and ns.router_mode == "random"
    with pytest.raises(ConfigError, match=r"KVFLOW_ROUTER_MODE.*did you mean 'random'"):
        parse_layered(_frontend_parser(), [], env={"KVFLOW_ROUTER_MODE": "randm"})


@pytest.mark.parametrize(("text", "expect"), [
    ("[frontend]\nhttp_prot = 1\n", "unknown key 'http_prot' in [frontend]; did you mean 'http_port'?"),
    ("[frontnd]\nhttp_port = 1\n", "unknown section [frontnd]; did you mean 'frontend'?"),
    ("[frontend]\nhttp_port = 'x'\n", "bad value 'x' for --http-port"),
    ("[frontend\n", "is not valid TOML"),
])
def test_file_mistakes_name_the_fix(tmp_path, text, expect) -> None:
    cfg = tmp_path / "kvflow.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_layered(_frontend_parser(), ["--config", str(cfg)], env={})
    assert expect in str(err.value)


def test_worker_section_holds_any_engines_flags(tmp_path) -> None:
    from kvflow.engines.worker import parse_args

    cfg = tmp_path / "kvflow.toml"
    cfg.write_text('[worker]\nengine = "mocker"\nmodel_path = "m"\nspeedup_ratio = 7.5\n'
                   'echo_delay = 0.5\n')
    ns = parse_args(["--config", str(cfg)])
    assert (ns.engine, ns.model_path, ns.mocker_speedup_ratio) == ("mocker", "m", 7.5)
    ns = parse_args(["--config", str(cfg), "--engine", "echo"])  # the mocker's keys are skipped
    assert ns.engine == "echo" and ns.echo_delay == 0.5


def test_example_config_is_valid() -> None:
    from kvflow.engines.worker import parse_args

    example = str(ROOT / "examples" / "kvflow.toml")
    ns = parse_layered(_frontend_parser(), ["--config", example], env={})
    assert ns.http_port == 8000 and ns.router_policy == "kv"
    ns = parse_args(["--config", example, "--engine", "mocker", "--model-path", "m"])
    assert ns.num_workers == 1 and ns.mocker_speedup_ratio == 10.0


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvflow.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_frontend_process_takes_port_from_file_then_env(stack, tmp_path) -> None:
    file_port, env_port = _free_port(), _free_port()
    cfg = tmp_path / "kvflow.toml"
    cfg.write_text(f"[frontend]\nhttp_port = {file_port}\n")
    env = {**stack.env, "KVFLOW_CONFIG": str(cfg)}
    proc = kvflow_proc("frontend", env=env, log_dir=stack.log_dir, name="frontend")
    stack.procs.append(proc)
    proc.wait_for_output("listening on", timeout=60)
    assert re.search(rf"listening on http://127.0.0.1:{file_port}\b", proc.output())
    proc.stop()
    proc = kvflow_proc("frontend", env={**env, "KVFLOW_HTTP_PORT": str(env_port)}, log_dir=stack.log_dir,
                       name="frontend")
    stack.procs.append(proc)
    proc.wait_for_output("listening on", timeout=60)
    assert re.search(rf"listening on http://127.0.0.1:{env_port}\b", proc.output())


def test_unknown_key_is_one_line(stack, tmp_path) -> None:
    cfg = tmp_path / "kvflow.toml"
    cfg.write_text("[worker]\nnum_worker = 2\n")
    out = _run({**stack.env, "KVFLOW_CONFIG": str(cfg)}, "worker", "--engine", "echo", "--model-path", "x")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"kvflow worker: error: config file {cfg}: unknown key 'num_worker' in [worker]; "
        "did you mean 'num_workers'?"]
