"""The engine contract inside a worker process, and the registry of engines by name.

An engine turns `PreprocessedRequest`s into streams of `EngineOutput`. The worker
process owns the runtime; it hands each engine an `EngineHooks` to publish KV
events and load metrics, and serves `engine.generate` on an endpoint.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry

from kvflow.kv.connector import ConnectorFactory
from kvflow.llm.kv_events import CacheSnapshot, KvEvent, LoadMetrics
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.runtime.context import Context


def _drop_events(events: list[KvEvent]) -> None:
    return None


def _drop_metrics(metrics: LoadMetrics) -> None:
    return None


@dataclass
class EngineHooks:
    """Where an engine sends what it publishes. Defaults drop everything."""

    worker_id: int = 0
    publish_kv_events: Callable[[list[KvEvent]], None] = _drop_events
    publish_load: Callable[[LoadMetrics], None] = _drop_metrics
    # Builds the engine's KV connector once its KV memory exists (disaggregation, tiers).
    make_connector: ConnectorFactory | None = None
    # The worker process's Prometheus registry (its /metrics), for engine-side metrics.
    metrics_registry: CollectorRegistry | None = None


class Engine(Protocol):
    """What every engine implements."""

    async def start(self) -> None: ...

    def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]: ...

    def cache_snapshot(self) -> CacheSnapshot | None:
        """The engine's whole KV cache state, for routers recovering from a gap."""
        ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class EngineSpec:
    """A registered engine: how to add its CLI flags and how to build it."""

    name: str
    add_args: Callable[[argparse.ArgumentParser], None]
    build: Callable[[argparse.Namespace, EngineHooks], Engine]
    # Flags a worker passes to register_llm (e.g. block size) derived from args.
    card_overrides: Callable[[argparse.Namespace], dict] = field(default=lambda ns: {})


_ENGINES: dict[str, EngineSpec] = {}


def register_engine(spec: EngineSpec) -> EngineSpec:
    assert spec.name not in _ENGINES, f"engine {spec.name!r} registered twice"
    _ENGINES[spec.name] = spec
    return spec


def engine_names() -> list[str]:
    _load_builtin()
    return sorted(_ENGINES)


def get_engine(name: str) -> EngineSpec:
    _load_builtin()
    if name not in _ENGINES:
        raise KeyError(f"unknown engine {name!r}; known engines: {', '.join(sorted(_ENGINES))}")
    return _ENGINES[name]


def _load_builtin() -> None:
    """Import the built-in engine modules so they register themselves."""
    import importlib

    for module in ("kvflow.engines.echo", "kvflow.engines.mocker", "kvflow.engines.native"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not exc.name.startswith("kvflow"):
                continue  # optional dependency (torch) missing: engine unavailable
            if exc.name != module:
                raise
