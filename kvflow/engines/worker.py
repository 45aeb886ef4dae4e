"""The worker process: builds an engine by name and serves it over the runtime.

For each engine instance (`--num-workers N` runs N in one process) it serves
`<ns>.<component>.generate` (PreprocessedRequest → EngineOutput stream) and
`<ns>.<component>.kv_snapshot`, publishes KV events and load metrics on the
namespace's event plane, and registers the model card under its instance id.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Gauge

from kvflow.engines.base import Engine, EngineHooks, EngineSpec, engine_names, get_engine
from kvflow.engines.traced import traced
from kvflow.kv.disagg import disagg_connector_factory
from kvflow.kv.transfer.agent import TransferAgent, TransferConfig
from kvflow.kv.transfer.backends import backend_names
from kvflow.kv.transfer.metrics import metrics_for
from kvflow.llm.kv_events import (
    KV_EVENTS_SUBJECT,
    LOAD_METRICS_SUBJECT,
    KvEvent,
    KvEventBatch,
    LoadMetrics,
)
from kvflow.llm.protocol import PreprocessedRequest
from kvflow.llm.register import ROLE_AGGREGATED, ROLE_PREFILL, ROLES, ModelInput, ModelType, register_llm
from kvflow.runtime import Context, DistributedRuntime, tracing
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
    role: str
    kv_transfer_lease_s: float
    kv_transfer_timeout_s: float
    kv_transfer_backends: str

    @property
    def transfer_config(self) -> TransferConfig:
        names = tuple(n.strip() for n in self.kv_transfer_backends.split(",") if n.strip())
        return TransferConfig(lease_s=self.kv_transfer_lease_s,
                              timeout_s=self.kv_transfer_timeout_s, backends=names)


def build_parser(engine: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvflow worker", description="Serve an engine.")
    parser.add_argument("--engine", required=True, choices=engine_names())
    parser.add_argument("--model-path", required=True, help="local HF-format directory or hub id")
    parser.add_argument("--model-name", default=None, help="name clients use (default: the path)")
    parser.add_argument("--component", default=None,
                        help="component to serve on (default: 'prefill' for --role prefill, "
                        "else 'backend')")
    parser.add_argument("--role", default="aggregated", choices=ROLES,
                        help="aggregated, or one side of disaggregated serving (default: %(default)s)")
    transfer = TransferConfig()
    parser.add_argument("--kv-transfer-lease-s", type=float, default=transfer.lease_s,
                        help="release blocks held for a transfer nobody pulls after this long")
    parser.add_argument("--kv-transfer-timeout-s", type=float, default=transfer.timeout_s,
                        help="give up on one KV pull (the request recomputes) after this long")
    parser.add_argument("--kv-transfer-backends", default=",".join(transfer.backends),
                        help="KV transfer backends to use, best first (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=1, help="engine instances in this process")
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--migration-limit", type=int, default=None)
    parser.add_argument("--tool-call-parser", default=None)
    parser.add_argument("--reasoning-parser", default=None)
    parser.add_argument("--custom-template", default=None, help="chat template file (jinja)")
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
    values = {k: getattr(ns, k) for k in names}
    if values["component"] is None:
        values["component"] = "prefill" if values["role"] == ROLE_PREFILL else "backend"
    unknown = set(values["kv_transfer_backends"].split(",")) - set(backend_names()) - {""}
    if unknown:
        raise ValueError(f"unknown --kv-transfer-backends {sorted(unknown)}; "
                         f"known: {', '.join(backend_names())}")
    return WorkerArgs(**values)


class LoadGauges:
    """Each engine's latest LoadMetrics as gauges on the worker's status port (/metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"kvflow_worker_{name}", doc, ["worker_id"], registry=registry)

        self.active_blocks = gauge("kv_active_blocks", "KV blocks in use")
        self.total_blocks = gauge("kv_total_blocks", "KV blocks in the engine's cache")
        self.host_active_blocks = gauge("kv_host_active_blocks", "KV blocks in use in the host tier")
        self.host_total_blocks = gauge("kv_host_total_blocks", "KV blocks in the host (CPU) tier")
        self.running = gauge("running_requests", "Requests the engine is running")
        self.waiting = gauge("waiting_requests", "Requests waiting in the engine's queue")

    def update(self, metrics: LoadMetrics) -> None:
        worker = f"{metrics.worker_id:x}"
        self.active_blocks.labels(worker).set(metrics.active_blocks)
        self.total_blocks.labels(worker).set(metrics.total_blocks)
        self.host_active_blocks.labels(worker).set(metrics.host_active_blocks)
        self.host_total_blocks.labels(worker).set(metrics.host_total_blocks)
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


def _model_types(overrides: dict) -> ModelType:
    """Chat and completions; embeddings too when the engine serves them."""
    types = ModelType.Chat | ModelType.Completions
    return types | ModelType.Embedding if overrides.get("embeddings") else types


async def serve_instance(
    runtime: DistributedRuntime, spec: EngineSpec, ns: argparse.Namespace, args: WorkerArgs,
    instance_id: int, gauges: LoadGauges | None = None,
) -> None:
    namespace = runtime.config.namespace
    publisher = EventPublisher(runtime, namespace, instance_id, gauges)
    hooks, agents = publisher.hooks(), list[TransferAgent]()
    if args.role != ROLE_AGGREGATED:
        hooks.make_connector = disagg_connector_factory(
            runtime, args.component, instance_id, args.transfer_config,
            metrics_for(runtime.metrics_registry), agents)
    engine = spec.build(ns, hooks)
    await engine.start()
    for agent in agents:
        await agent.start()
    component = runtime.namespace(namespace).component(args.component)
    generate, snapshot = component.endpoint("generate"), component.endpoint("kv_snapshot")
    overrides = spec.card_overrides(ns)
    await register_llm(
        ModelInput.Tokens,
        _model_types(overrides),
        generate,
        args.model_path,
        model_name=args.model_name,
        context_length=args.context_length,
        kv_cache_block_size=overrides.get("kv_cache_block_size"),
        migration_limit=args.migration_limit,
        custom_template_path=args.custom_template,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        instance_id=instance_id,
        role=args.role,
        guided_decoding=bool(overrides.get("guided_decoding")),
    )
    try:
        await asyncio.gather(
            generate.serve(
                traced(engine.generate, instance_id) if tracing.tracer() else engine.generate,
                instance_id=instance_id, request_type=PreprocessedRequest,
            ),
            snapshot.serve(_snapshot_handler(engine), instance_id=instance_id),
        )
    finally:
        for agent in agents:
            await agent.close()
        await engine.stop()




async def run_worker(runtime: DistributedRuntime, ns: argparse.Namespace) -> None:
    args = worker_args(ns)
    spec = get_engine(args.engine)
    ids = [runtime.lease_id] + [runtime.new_instance_id() for _ in range(args.num_workers - 1)]
    log.info("worker: engine=%s model=%s instances=%d", args.engine, args.model_path, len(ids))
    gauges = LoadGauges(runtime.metrics_registry)
    tracing.setup_tracing(runtime.config, "kvflow-worker")
    try:
        await asyncio.gather(*(serve_instance(runtime, spec, ns, args, iid, gauges) for iid in ids))
    finally:
        tracing.shutdown_tracing()


def runtime_config(ns: argparse.Namespace) -> RuntimeConfig:
    return config_from_args(RuntimeConfig, "runtime", ns)
