"""The mocker is registered by name, with flags whose defaults come from MockerConfig."""

from __future__ import annotations

import argparse

import pytest

from kvflow.engines.base import EngineHooks, get_engine
from kvflow.engines.mocker import MockerConfig, MockerEngine


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    get_engine("mocker").add_args(parser)
    return parser.parse_args(list(argv))


def test_flags_build_an_engine_with_that_config() -> None:
    ns = parse(
        "--num-gpu-blocks", "100", "--block-size", "32", "--speedup-ratio", "0",
        "--mocker-seed", "3", "--num-host-blocks", "50", "--mocker-output", "echo",
        "--kv-transfer-bandwidth", "1e9", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
    )  # fmt: skip
    spec = get_engine("mocker")
    engine = spec.build(ns, EngineHooks(worker_id=9))
    assert isinstance(engine, MockerEngine)
    assert engine.config == MockerConfig(
        num_gpu_blocks=100, block_size=32, speedup_ratio=0.0, seed=3, num_host_blocks=50,
        output="echo", kv_transfer_bandwidth=1e9, max_num_seqs=8, max_num_batched_tokens=256,
    )  # fmt: skip
    assert engine.pool.worker_id == 9
    assert spec.card_overrides(ns) == {"kv_cache_block_size": 32}


def test_defaults_come_from_the_dataclass() -> None:
    ns = parse()
    assert get_engine("mocker").build(ns, EngineHooks()).config == MockerConfig()


def test_unknown_names_are_refused_at_parse_time() -> None:
    with pytest.raises(SystemExit):
        parse("--mocker-output", "both")
    with pytest.raises(ValueError, match="random"):
        MockerConfig(output="nonsense")
    with pytest.raises(ValueError, match="prefix caching"):
        MockerConfig(num_host_blocks=4, enable_prefix_caching=False)
