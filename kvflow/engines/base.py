"""The engine contract inside a worker process, and the registry of engines by name.

An engine turns `PreprocessedRequest`s into streams of `EngineOutput`. The worker
process owns the runtime; it hands each engine an `EngineHooks` to publish KV
events and load metrics, and serves `engine.generate` on an endpoint.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from kvflow.kv.connector import ConnectorFactory
from kvflow.llm.kv_events import CacheSnapshot, KvEvent, LoadMetrics
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.runtime.context import Context
from kvflow.runtime.plugins import PluginRegistry


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
    # Whether the built engine publishes KV events (adapters say so when they start).
    kv_events: Callable[[argparse.Namespace], bool] = field(default=lambda ns: False)


ENTRY_POINT_GROUP = "kvflow.engines"


def _check_spec(name: str, spec: Any) -> EngineSpec:
    if not isinstance(spec, EngineSpec) or spec.name != name:
        raise TypeError(f"entry point {name} of {ENTRY_POINT_GROUP} must name an EngineSpec "
                        f"called {name!r}")
    return spec


# The built-in modules are imported directly too, so they work from a source tree whose
# installed metadata predates their entry points.
ENGINES: PluginRegistry[EngineSpec] = PluginRegistry(
    "engine", ENTRY_POINT_GROUP, check=_check_spec, builtin_modules=(
        "kvflow.engines.echo", "kvflow.engines.mocker", "kvflow.engines.native",
        "kvflow.engines.vllm"))


def register_engine(spec: EngineSpec) -> EngineSpec:
    """Register `spec` under its name; registering the same spec again is a no-op."""
    return ENGINES.add(spec.name, spec)


def engine_names() -> list[str]:
    return ENGINES.names()


def get_engine(name: str) -> EngineSpec:
    return ENGINES.get(name)
