"""The worker process: builds an engine by name and serves it over the runtime.

For each engine instance (`--num-workers N` runs N in one process) it serves
`<ns>.<component>.generate` (PreprocessedRequest → EngineOutput stream) and
`<ns>.<component>.kv_snapshot`, publishes KV events and load metrics on the
namespace's event plane, and registers the model card under its instance id.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Gauge

from kvflow.engines.adapter import EngineAdapter, served_generate
from kvflow.engines.base import Engine, EngineHooks, EngineSpec, engine_names, get_engine
from kvflow.engines.selfcheck import (
    DEFAULT_EVENTS_TIMEOUT,
    GENERIC_HINT,
    KvEventSelfCheck,
    check_block_size,
    missing_gauge,
)
from kvflow.llm.kv_events import (
    KV_EVENTS_SUBJECT,
    LOAD_METRICS_SUBJECT,
    KvEvent,
    KvEventBatch,
    LoadMetrics,
)
from kvflow.llm.protocol import PreprocessedRequest
from kvflow.llm.register import ModelInput, ModelType, register_llm
from kvflow.runtime import Context, DistributedRuntime
from kvflow.runtime.config import RuntimeConfig, add_config_args, config_from_args

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerArgs:
    engine: str
    model_path: str
    model_name: str | None
    component: str
    num_workers: int
    context_length: int | None
    migration_limit: int | None
    tool_call_parser: str | None
    reasoning_parser: str | None
    custom_template: str | None
    kv_events_check_timeout: float


def build_parser(engine: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvflow worker", description="Serve an engine.")
    parser.add_argument("--engine", required=True, choices=engine_names())
    parser.add_argument("--model-path", required=True, help="local HF-format directory or hub id")
    parser.add_argument("--model-name", default=None, help="name clients use (default: the path)")
    parser.add_argument("--component", default="backend")
    parser.add_argument("--num-workers", type=int, default=1, help="engine instances in this process")
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--migration-limit", type=int, default=None)
    parser.add_argument("--tool-call-parser", default=None)
    parser.add_argument("--reasoning-parser", default=None)
    parser.add_argument("--custom-template", default=None, help="chat template file (jinja)")
    parser.add_argument(
        "--kv-events-check-timeout", type=float, default=DEFAULT_EVENTS_TIMEOUT,
        help="seconds after the first request by which the worker's own KV events must arrive (0: off)",
    )
    add_config_args(parser.add_argument_group("runtime"), RuntimeConfig)  # type: ignore[arg-type]
    if engine is not None:
        get_engine(engine).add_args(parser)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engine")
    known, _ = pre.parse_known_args(argv)
    name = known.engine if known.engine in engine_names() else None
    return build_parser(name).parse_args(argv)


def worker_args(ns: argparse.Namespace) -> WorkerArgs:
    names = WorkerArgs.__dataclass_fields__
    return WorkerArgs(**{k: getattr(ns, k) for k in names})


class LoadGauges:
    """Each engine's latest LoadMetrics as gauges on the worker's status port (/metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"kvflow_worker_{name}", doc, ["worker_id"], registry=registry)

        self.active_blocks = gauge("kv_active_blocks", "KV blocks in use")
        self.total_blocks = gauge("kv_total_blocks", "KV blocks in the engine's cache")
        self.running = gauge("requests_running", "Requests the engine is running")
        self.waiting = gauge("requests_waiting", "Requests waiting in the engine's queue")
        self.events_missing = missing_gauge(registry)

    def update(self, metrics: LoadMetrics) -> None:
        worker = f"{metrics.worker_id:x}"
        self.active_blocks.labels(worker).set(metrics.active_blocks)
        self.total_blocks.labels(worker).set(metrics.total_blocks)
        self.running.labels(worker).set(metrics.num_running)
        self.waiting.labels(worker).set(metrics.num_waiting)


class EventPublisher:
    """Sends an engine's KV events and load metrics on the namespace event plane."""

    def __init__(
        self, runtime: DistributedRuntime, namespace: str, worker_id: int,
        gauges: LoadGauges | None = None,
    ) -> None:
        self.events = runtime.namespace(namespace).events
        self.worker_id = worker_id
        self.gauges = gauges
        self._encode = msgspec.msgpack.Encoder().encode

    def hooks(self) -> EngineHooks:
        return EngineHooks(self.worker_id, self.publish_kv_events, self.publish_load)

    def publish_kv_events(self, events: list[KvEvent]) -> None:
        if events:
            payload = self._encode(KvEventBatch(self.worker_id, events))
            asyncio.ensure_future(self.events.publish(KV_EVENTS_SUBJECT, payload))

    def publish_load(self, metrics: LoadMetrics) -> None:
        if self.gauges is not None:
            self.gauges.update(metrics)
        asyncio.ensure_future(self.events.publish(LOAD_METRICS_SUBJECT, self._encode(metrics)))


def _snapshot_handler(engine: Engine) -> Any:
    async def kv_snapshot(request: Any, context: Context) -> AsyncIterator[Any]:
        snap = engine.cache_snapshot()
        if snap is not None:
            yield snap

    return kv_snapshot


@dataclass(frozen=True)
class EngineFacts:
    """What the worker registers and checks for one started engine."""

    context_length: int | None
    kv_block_size: int | None
    kv_events: bool
    events_hint: str


def engine_facts(engine: Engine, spec: EngineSpec, ns: argparse.Namespace, args: WorkerArgs) -> EngineFacts:
    if isinstance(engine, EngineAdapter) and engine.info is not None:
        info = engine.info
        return EngineFacts(
            args.context_length or info.context_length, info.kv_block_size,
            info.publishes_kv_events, engine.events_hint(),
        )
    block = spec.card_overrides(ns).get("kv_cache_block_size")
    return EngineFacts(args.context_length, block, spec.kv_events(ns), GENERIC_HINT)


def generate_handler(engine: Engine, check: KvEventSelfCheck | None) -> Any:
    """The generate endpoint's handler: adapters get abort-on-cancel; all feed the self-check."""
    inner = engine.generate
    if isinstance(engine, EngineAdapter):
        inner = functools.partial(served_generate, engine)
    if check is None:
        return inner

    def handler(request: PreprocessedRequest, context: Context) -> AsyncIterator[Any]:
        check.on_request()
        return inner(request, context)

    return handler


def self_check(
    runtime: DistributedRuntime, facts: EngineFacts, args: WorkerArgs, instance_id: int,
    gauges: LoadGauges | None,
) -> KvEventSelfCheck | None:
    if not facts.kv_events or args.kv_events_check_timeout <= 0 or gauges is None:
        return None
    events = runtime.namespace(runtime.config.namespace).events
    return KvEventSelfCheck(
        events, instance_id, gauges.events_missing, facts.events_hint, args.kv_events_check_timeout
    )


async def serve_instance(
    runtime: DistributedRuntime, spec: EngineSpec, ns: argparse.Namespace, args: WorkerArgs,
    instance_id: int, gauges: LoadGauges | None = None,
) -> None:
    namespace = runtime.config.namespace
    publisher = EventPublisher(runtime, namespace, instance_id, gauges)
    engine = spec.build(ns, publisher.hooks())
    await engine.start()
    facts = engine_facts(engine, spec, ns, args)
    component = runtime.namespace(namespace).component(args.component)
    generate, snapshot = component.endpoint("generate"), component.endpoint("kv_snapshot")
    entry = await register_llm(
        ModelInput.Tokens,
        ModelType.Chat | ModelType.Completions,
        generate,
        args.model_path,
        model_name=args.model_name,
        context_length=facts.context_length,
        kv_cache_block_size=spec.card_overrides(ns).get("kv_cache_block_size") or facts.kv_block_size,
        migration_limit=args.migration_limit,
        custom_template_path=args.custom_template,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        instance_id=instance_id,
    )
    if facts.kv_block_size is not None:
        check_block_size(facts.kv_block_size, entry.card.kv_block_size)
    check = self_check(runtime, facts, args, instance_id, gauges)
    try:
        await asyncio.gather(
            generate.serve(
                generate_handler(engine, check), instance_id=instance_id,
                request_type=PreprocessedRequest,
            ),
            snapshot.serve(_snapshot_handler(engine), instance_id=instance_id),
        )
    finally:
        if check is not None:
            check.close()
        await engine.stop()


async def run_worker(runtime: DistributedRuntime, ns: argparse.Namespace) -> None:
    args = worker_args(ns)
    spec = get_engine(args.engine)
    ids = [runtime.lease_id] + [runtime.new_instance_id() for _ in range(args.num_workers - 1)]
    log.info("worker: engine=%s model=%s instances=%d", args.engine, args.model_path, len(ids))
    gauges = LoadGauges(runtime.metrics_registry)
    await asyncio.gather(*(serve_instance(runtime, spec, ns, args, iid, gauges) for iid in ids))


def runtime_config(ns: argparse.Namespace) -> RuntimeConfig:
    return config_from_args(RuntimeConfig, "runtime", ns)
