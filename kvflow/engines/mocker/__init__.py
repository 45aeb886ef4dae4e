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

from kvflow.engines.base import EngineHooks, EngineSpec, register_engine
from kvflow.engines.mocker.config import MockerConfig, add_mocker_args, config_from_args
from kvflow.engines.mocker.engine import MockerEngine

__all__ = ["MockerConfig", "MockerEngine"]


def _build(ns: argparse.Namespace, hooks: EngineHooks) -> MockerEngine:
    return MockerEngine(config_from_args(ns), hooks)


def _card_overrides(ns: argparse.Namespace) -> dict:
    return {"kv_cache_block_size": ns.mocker_block_size}


register_engine(
    EngineSpec(name="mocker", add_args=add_mocker_args, build=_build, card_overrides=_card_overrides)
)
