"""The engine contract inside a worker process, and the registry of engines by name.

An engine turns `PreprocessedRequest`s into streams of `EngineOutput`. The worker
process owns the runtime; it hands each engine an `EngineHooks` to publish KV
events and load metrics, and serves `engine.generate` on an endpoint.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from kvflow.kv.connector import ConnectorFactory
from kvflow.llm.kv_events import CacheSnapshot, KvEvent, LoadMetrics
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.runtime.context import Context

log = logging.getLogger(__name__)


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


_ENGINES: dict[str, EngineSpec] = {}
ENTRY_POINT_GROUP = "kvflow.engines"
# Imported directly too, so the built-ins work from a source tree whose installed
# metadata predates their entry points.
_BUILTIN_MODULES = (
    "kvflow.engines.echo", "kvflow.engines.mocker", "kvflow.engines.native", "kvflow.engines.vllm",
)


def register_engine(spec: EngineSpec) -> EngineSpec:
    """Register `spec` under its name; registering the same spec again is a no-op."""
    known = _ENGINES.get(spec.name)
    assert known is None or known is spec, f"engine {spec.name!r} registered twice"
    _ENGINES[spec.name] = spec
    return spec


def engine_names() -> list[str]:
    _load_engines()
    return sorted(_ENGINES)


def get_engine(name: str) -> EngineSpec:
    _load_engines()
    if name not in _ENGINES:
        raise KeyError(f"unknown engine {name!r}; known engines: {', '.join(sorted(_ENGINES))}")
    return _ENGINES[name]


def _load_engines() -> None:
    """Register the built-in engines and every `kvflow.engines` entry point."""
    for module in _BUILTIN_MODULES:
        _optional(lambda m=module: importlib.import_module(m), module)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _ENGINES:
            _register_entry_point(ep)


def _register_entry_point(ep: importlib.metadata.EntryPoint) -> None:
    spec = _optional(ep.load, ep.module)
    if spec is None:
        return
    if not isinstance(spec, EngineSpec) or spec.name != ep.name:
        raise TypeError(f"entry point {ep.name} = {ep.value!r} must name an EngineSpec called {ep.name!r}")
    register_engine(spec)


def _optional(load: Callable[[], Any], module: str) -> Any:
    """`load()`, or None when it fails only for lack of a third-party dependency (torch)."""
    try:
        return load()
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing.startswith("kvflow") and missing != module:
            raise
        log.debug("engine module %s unavailable: %s", module, exc)
        return None
