"""The mocker engine: a simulated engine on the real scheduler, registered as "mocker".

- config.py: MockerConfig and its CLI flags.
- timing.py: roofline step-time model (defaults: 8B model on one H100), JSON profiles.
- outputs.py: output token modes by name ("random", "echo").
- tiers.py: simulated host tier and remote-prefill KV arrival (a KvConnector).
- stream.py: per-request output stream between the engine loop and generate().
- engine.py: MockerEngine, the asyncio loop schedule -> simulate -> update.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from kvflow.engines.base import EngineHooks, EngineSpec, register_engine
from kvflow.engines.mocker.config import MockerConfig, add_mocker_args, config_from_args
from kvflow.engines.mocker.engine import MockerEngine

__all__ = ["MockerConfig", "MockerEngine"]


def _build(ns: argparse.Namespace, hooks: EngineHooks) -> MockerEngine:
    config = config_from_args(ns)
    vocab = _model_vocab_size(getattr(ns, "model_path", None))
    if vocab:  # random outputs stay inside the served model's vocabulary
        config = dataclasses.replace(config, vocab_size=vocab)
    return MockerEngine(config, hooks)


def _model_vocab_size(model_path: str | None) -> int | None:
    """vocab_size from the model directory's config.json, when there is one."""
    if not model_path:
        return None
    path = Path(model_path) / "config.json"
    try:
        return int(json.loads(path.read_text())["vocab_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _card_overrides(ns: argparse.Namespace) -> dict:
    return {"kv_cache_block_size": ns.mocker_block_size}


SPEC = register_engine(
    EngineSpec(name="mocker", add_args=add_mocker_args, build=_build, card_overrides=_card_overrides,
    kv_events=lambda ns: True)
)
