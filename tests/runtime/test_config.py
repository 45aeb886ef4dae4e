"""Config layering: defaults < file < env < CLI, with names and values checked."""

from __future__ import annotations

import argparse
import json

import pytest

from kvflow.runtime.config import RuntimeConfig, add_config_args, config_from_args, load_config


def test_layers_in_order(tmp_path) -> None:
    cfg_file = tmp_path / "kvflow.json"
    cfg_file.write_text(json.dumps({"runtime": {"namespace": "from-file", "lease_ttl": 3.0}}))
    env = {"KVFLOW_CONFIG": str(cfg_file), "KVFLOW_LEASE_TTL": "4.5", "KVFLOW_SYSTEM_PORT": "0"}
    cfg = load_config(RuntimeConfig, "runtime", env=env, overrides={"lease_ttl": 7.0})
    assert cfg.namespace == "from-file"  # file beats default
    assert cfg.lease_ttl == 7.0  # CLI beats env beats file
    assert cfg.system_port == 0
    assert load_config(RuntimeConfig, "runtime", env=env).lease_ttl == 4.5


def test_bad_names_and_values_are_clear(tmp_path) -> None:
    with pytest.raises(ValueError, match="discovery must be one of etcd, file, memory"):
        RuntimeConfig(discovery="zookeeper")
    with pytest.raises(ValueError, match="KVFLOW_LEASE_TTL"):
        load_config(RuntimeConfig, "runtime", env={"KVFLOW_LEASE_TTL": "soon"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"runtime": {"lease": 1}}))
    with pytest.raises(ValueError, match="unknown key 'lease' in \\[runtime\\]; did you mean 'lease_ttl'"):
        load_config(RuntimeConfig, "runtime", env={}, file=str(bad))


def test_argparse_defaults_do_not_mask_env(monkeypatch) -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser, RuntimeConfig)
    monkeypatch.setenv("KVFLOW_NAMESPACE", "env-ns")
    ns = parser.parse_args(["--lease-ttl", "2"])
    cfg = config_from_args(RuntimeConfig, "runtime", ns)
    assert (cfg.namespace, cfg.lease_ttl) == ("env-ns", 2.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--lease-ttl", "two"])
