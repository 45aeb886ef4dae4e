"""The "native" engine's registration: flags, config, card overrides, and a torch-free import."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kvflow.engines.base import get_engine
from kvflow.engines.native import config_from_args
from kvflow.llm.structured import available


def _parse(*argv: str) -> argparse.Namespace:
    from kvflow.engines.worker import build_parser

    parser = build_parser("native")
    parser.set_defaults(engine="native")
    for action in parser._actions:
        if action.dest in ("engine", "model_path"):
            action.required = False
    return parser.parse_args(list(argv))


def test_flags_build_the_config() -> None:
    ns = _parse("--model-path", "/m", "--dtype", "bf16", "--block-size", "32",
                "--num-gpu-blocks", "100", "--max-num-seqs", "8", "--enforce-eager", "--seed", "3")
    config = config_from_args(ns)
    assert (config.model_path, config.dtype, config.block_size) == ("/m", "bf16", 32)
    assert (config.num_gpu_blocks, config.max_num_seqs, config.enforce_eager) == (100, 8, True)
    overrides = get_engine("native").card_overrides(ns)
    # The card announces guided decoding when the grammar library is installed.
    assert overrides == {"kv_cache_block_size": 32, "guided_decoding": available(),
                         "embeddings": True}


def test_stream_interval_flag() -> None:
    assert config_from_args(_parse("--model-path", "/m")).stream_interval == 1
    assert config_from_args(_parse("--model-path", "/m", "--stream-interval", "4")).stream_interval == 4
    with pytest.raises(ValueError, match="--stream-interval"):
        config_from_args(_parse("--model-path", "/m", "--stream-interval", "0"))


def test_missing_model_path_and_bad_values_are_explained() -> None:
    with pytest.raises(ValueError, match="--model-path"):
        config_from_args(_parse())
    with pytest.raises(ValueError, match="--gpu-memory-utilization"):
        config_from_args(_parse("--model-path", "/m", "--gpu-memory-utilization", "1.5"))


def test_registration_imports_no_torch() -> None:
    code = "import sys, kvflow.engines.native; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
