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
from kvflow.runtime.flags import config_section, flag_keys, parse_layered, tolerate_keys
from kvflow.runtime.threads import in_daemon_thread

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


WORKER_HELP = """Serve one engine (--num-workers instances) for one model over the runtime.

Engine flags are listed only for the chosen engine:
  kvflow worker --engine NAME --help      (NAME: {engines})
"""


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """The worker's own flags (kvflow run passes them through to its worker)."""
    g = parser.add_argument_group("worker")
    g.add_argument("--engine", required=True, choices=engine_names(),
                   help="the engine to run: echo (repeats the prompt), mocker (simulated, any "
                   "CPU), native (PyTorch)")
    g.add_argument("--model-path", required=True,
                   help="local Hugging Face model directory (tokenizer.json, config.json) or hub id")
    g.add_argument("--model-name", default=None,
                   help="the name clients use (default: the last part of --model-path)")
    g.add_argument("--component", default=None,
                   help="component to serve on (default: 'prefill' for --role prefill, else 'backend')")
    g.add_argument("--role", default="aggregated", choices=ROLES,
                   help="aggregated, or one side of disaggregated serving (default: %(default)s)")
    transfer = TransferConfig()
    g.add_argument("--kv-transfer-lease-s", type=float, default=transfer.lease_s,
                   help="release blocks held for a transfer nobody pulls after this long "
                   "(default: %(default)s)")
    g.add_argument("--kv-transfer-timeout-s", type=float, default=transfer.timeout_s,
                   help="give up on one KV pull (the request recomputes) after this long "
                   "(default: %(default)s)")
    g.add_argument("--kv-transfer-backends", default=",".join(transfer.backends),
                   help="KV transfer backends to use, best first (default: %(default)s)")
    g.add_argument("--num-workers", type=int, default=1, help="engine instances in this process")
    g.add_argument("--context-length", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's own)")
    g.add_argument("--migration-limit", type=int, default=None,
                   help="times a request of this model may move to another worker when its worker "
                   "is lost (default: the frontend's)")
    g.add_argument("--tool-call-parser", default=None,
                   help="parse tool calls from the output: hermes, llama3_json, mistral, or none "
                   "(default: picked from the chat template when it shows one of these formats)")
    g.add_argument("--reasoning-parser", default=None,
                   help="split <think> reasoning from the answer (e.g. deepseek_r1, qwen3)")
    g.add_argument("--custom-template", default=None, help="chat template file (Jinja) to use instead "
                   "of the model's")


def build_parser(engine: str | None = None) -> argparse.ArgumentParser:
    from kvflow.cli.help import new_parser  # the cli layer's parser style, without a cycle at import

    parser = new_parser("kvflow worker", WORKER_HELP.format(engines=", ".join(engine_names())))
    with config_section(parser, "worker"):
        add_worker_args(parser)
        if engine is not None:
            get_engine(engine).add_args(parser)
    tolerate_keys(parser, "worker", _all_engine_keys())
    with config_section(parser, "runtime"):
        add_config_args(parser.add_argument_group("runtime (discovery, planes; every command)"),
                        RuntimeConfig)  # type: ignore[arg-type]
    return parser


def _all_engine_keys() -> set[str]:
    """Config keys of every engine's flags: a shared [worker] section may hold any of them."""
    from kvflow.cli.help import new_parser

    keys: set[str] = set()
    for name in engine_names():
        parser = new_parser("kvflow worker", "")
        with config_section(parser, "worker"):
            get_engine(name).add_args(parser)
        keys |= flag_keys(parser)
    return keys


def parse_args(argv: list[str]) -> argparse.Namespace:
    pre = build_parser()
    pre.add_help = False
    pre.exit_on_error = False
    for action in pre._actions:
        action.required = False
    try:
        known, _ = parse_layered(pre, [a for a in argv if a not in ("-h", "--help")], known_only=True)
        name = known.engine if known.engine in engine_names() else None
    except argparse.ArgumentError:
        name = None
    return parse_layered(build_parser(name), argv)


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
        self.registry = runtime.metrics_registry
        self.worker_id = worker_id
        self.gauges = gauges
        self._encode = msgspec.msgpack.Encoder().encode

    def hooks(self) -> EngineHooks:
        return EngineHooks(self.worker_id, self.publish_kv_events, self.publish_load,
                           metrics_registry=self.registry)

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
    # Built off the loop: an engine's heavy imports (torch) must not hold off a signal.
    engine = await in_daemon_thread(spec.build, ns, hooks, name="engine-build")
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
