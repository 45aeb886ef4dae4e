"""`kvflow frontend`: the OpenAI-compatible HTTP frontend over discovered workers."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Metric

from kvflow.cli.help import new_parser
from kvflow.frontend import FrontendConfig, HttpFrontend, ModelManager
from kvflow.frontend.canary import add_canary_args, canary_config_from_args
from kvflow.frontend.disagg import MODES, DisaggConfig
from kvflow.frontend.pipeline import DEFAULT_MIGRATION_LIMIT, MigrationSettings
from kvflow.frontend.stalls import add_stall_args, stall_config_from_args
from kvflow.frontend.watcher import DEFAULT_GRACE_S, ModelWatcher
from kvflow.router.config import add_router_args
from kvflow.router.config import config_from_args as router_from_args
from kvflow.runtime import DistributedRuntime, tracing
from kvflow.runtime.component import parse_endpoint_path
from kvflow.runtime.config import RuntimeConfig, add_config_args, build_config, config_from_args
from kvflow.runtime.errors import ConfigError, is_addr_in_use, port_in_use
from kvflow.runtime.flags import config_section, parse_layered
from kvflow.runtime.logs import setup_logging
from kvflow.runtime.tasks import cancel_and_wait
from kvflow.runtime.worker import install_uvloop, run_with_runtime

log = logging.getLogger(__name__)
ROUTER_MODES = {
    "kv": "kv",
    "round-robin": "round_robin",
    "random": "random",
    "least-loaded": "least_loaded",
    "direct": "direct",
}


def add_frontend_args(parser: argparse.ArgumentParser) -> None:
    with config_section(parser, "frontend"):
        _add_http_args(parser)
        _add_overload_args(parser)
        add_disagg_args(parser)
    with config_section(parser, "router"):
        add_router_args(parser)


def _add_http_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("http")
    g.add_argument("--http-host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument("--http-port", type=int, default=8000,
                   help="port of the OpenAI-compatible API; 0 picks a free one")
    g.add_argument("--endpoint", default=None,
                   help="serve only models registered on this endpoint (dyn://ns.component.ep)")
    g.add_argument("--api-key", action="append", default=[],
                   help="accepted Bearer token (repeatable; none = no authentication)")
    g.add_argument("--tls-cert", dest="http_tls_cert", default=None,
                   help="PEM certificate to serve HTTPS (with --tls-key)")
    g.add_argument("--tls-key", dest="http_tls_key", default=None, help="PEM private key for --tls-cert")
    g.add_argument("--max-body-bytes", type=int, default=FrontendConfig.max_body_bytes,
                   help="larger request bodies get 413")
    add_connection_args(g)
    add_access_args(g)
    g.add_argument(
        "--anthropic-stable-prefix", action="store_true",
        default=FrontendConfig.anthropic_stable_prefix,
        help="/v1/messages: move system blocks after the last cache_control breakpoint to the "
        "last user turn, so a per-request system tail does not defeat prefix caching")
    g.add_argument(
        "--responses-store-size", type=int, default=FrontendConfig.responses_store_size,
        help="/v1/responses kept in memory for previous_response_id (default: %(default)s)")


def _add_overload_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("overload, migration and worker health")
    g.add_argument(
        "--max-inflight-per-model", type=int, default=FrontendConfig.max_inflight_per_model,
        help="requests in flight per model before new ones queue (default: 0 = no limit)")
    g.add_argument(
        "--max-queued-per-model", type=int, default=FrontendConfig.max_queued_per_model,
        help="requests that may wait for a slot; beyond them 429 + Retry-After (default: 0)")
    g.add_argument(
        "--queue-timeout", dest="queue_timeout_s", type=float,
        default=FrontendConfig.queue_timeout_s,
        help="seconds a queued request waits before 429 (default: %(default)s)")
    g.add_argument(
        "--overload-retry-after", dest="overload_retry_after_s", type=float,
        default=FrontendConfig.overload_retry_after_s,
        help="Retry-After seconds sent with 429 (default: %(default)s)")
    g.add_argument(
        "--migration-limit", type=int, default=DEFAULT_MIGRATION_LIMIT,
        help="times a request may move to another worker when its worker is lost; a "
        "worker's --migration-limit overrides it for its model (default: %(default)s)")
    g.add_argument(
        "--model-grace-period", type=float, default=DEFAULT_GRACE_S,
        help="seconds a model whose workers all left stays listed, answering 503 + Retry-After, "
        "before it is dropped (404); 0 drops it at once (default: %(default)s)")
    add_stall_args(g)
    add_canary_args(g)
    g.add_argument(
        "--router-mode",
        choices=sorted(ROUTER_MODES),
        default=None,
        help="how requests pick a worker (default: kv)",
    )


def add_disagg_args(parser: argparse.ArgumentParser) -> None:
    """Flags of frontend.disagg's rule (defaults from DisaggConfig)."""
    d = DisaggConfig()
    g = parser.add_argument_group("disaggregated prefill (models with --role prefill workers)")
    g.add_argument("--disagg-mode", choices=MODES, default=d.mode,
                   help="conditional: prefill remotely when it pays (rule below); always / "
                   "never (default: %(default)s)")
    g.add_argument("--disagg-min-remote-prefill-tokens", type=int,
                   default=d.min_remote_prefill_tokens,
                   help="prompt tokens not cached on the decode worker needed for a remote "
                   "prefill (default: %(default)s)")
    g.add_argument("--disagg-max-prefill-queue-tokens", type=int,
                   default=d.max_prefill_queue_tokens,
                   help="prefill locally when the least loaded prefill worker has more tokens "
                   "waiting (default: %(default)s)")
    g.add_argument("--disagg-prefill-timeout-s", type=float, default=d.prefill_timeout_s,
                   help="give up on a prefill worker after this long (default: %(default)s)")
    g.add_argument("--disagg-lend-prefill-workers", action=argparse.BooleanOptionalAction,
                   default=d.lend_prefill_workers,
                   help="conditional mode: requests prefilled in place may run whole on a "
                   "prefill worker the router scores cheaper (default: %(default)s)")


def disagg_config(ns: argparse.Namespace) -> DisaggConfig:
    return DisaggConfig(mode=ns.disagg_mode,
                        min_remote_prefill_tokens=ns.disagg_min_remote_prefill_tokens,
                        max_prefill_queue_tokens=ns.disagg_max_prefill_queue_tokens,
                        prefill_timeout_s=ns.disagg_prefill_timeout_s,
                        lend_prefill_workers=ns.disagg_lend_prefill_workers)


def add_connection_args(g: argparse._ArgumentGroup) -> None:
    """HTTP connection timeouts and limit (defaults from FrontendConfig)."""
    g.add_argument("--http-keepalive-timeout", dest="http_keepalive_timeout_s", type=float,
                   default=FrontendConfig.keepalive_timeout_s,
                   help="close a connection idle this long (default: %(default)s)")
    g.add_argument("--http-header-timeout", dest="http_header_timeout_s", type=float,
                   default=FrontendConfig.header_timeout_s,
                   help="408 + close when a request's headers take longer (default: %(default)s)")
    g.add_argument("--http-body-timeout", dest="http_body_timeout_s", type=float,
                   default=FrontendConfig.body_timeout_s,
                   help="408 + close when a request's body takes longer (default: %(default)s)")
    g.add_argument("--max-connections", type=int, default=FrontendConfig.max_connections,
                   help="open HTTP connections beyond which new ones get 503 (default: "
                   "%(default)s)")


def add_access_args(g: argparse._ArgumentGroup) -> None:
    """Who may call the routes besides /v1/* (see kvflow.frontend.routes)."""
    g.add_argument("--admin-api-key", action="append", default=[],
                   help="Bearer token for /debug/* (repeatable; default: the --api-key ones)")
    g.add_argument("--debug-routes", action=argparse.BooleanOptionalAction, default=True,
                   help="serve /debug/* (they reveal which worker caches which prompt prefix)")
    for name, what in (("metrics", "/metrics"), ("health", "/health and /live"),
                       ("openapi", "/openapi.json")):
        g.add_argument(f"--{name}-access", choices=("open", "keyed", "off"), default="open",
                       help=f"{what}: open, needs an API key, or off on the HTTP port "
                       "(default: %(default)s)")


def frontend_config(ns: argparse.Namespace) -> FrontendConfig:
    return build_config(FrontendConfig, dict(
        host=ns.http_host,
        port=ns.http_port,
        api_keys=tuple(ns.api_key),
        admin_api_keys=tuple(ns.admin_api_key),
        debug_routes=ns.debug_routes,
        metrics_access=ns.metrics_access,
        health_access=ns.health_access,
        openapi_access=ns.openapi_access,
        tls_cert=ns.http_tls_cert,
        tls_key=ns.http_tls_key,
        max_body_bytes=ns.max_body_bytes,
        keepalive_timeout_s=ns.http_keepalive_timeout_s,
        header_timeout_s=ns.http_header_timeout_s,
        body_timeout_s=ns.http_body_timeout_s,
        max_connections=ns.max_connections,
        max_inflight_per_model=ns.max_inflight_per_model,
        max_queued_per_model=ns.max_queued_per_model,
        queue_timeout_s=ns.queue_timeout_s,
        overload_retry_after_s=ns.overload_retry_after_s,
        anthropic_stable_prefix=ns.anthropic_stable_prefix,
        responses_store_size=ns.responses_store_size,
    ))


def router_config(ns: argparse.Namespace):  # -> KvRouterConfig
    try:
        config = router_from_args(ns)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if ns.router_mode:
        config = dataclasses.replace(config, policy=ROUTER_MODES[ns.router_mode])
    return config


async def serve_frontend(
    runtime: DistributedRuntime,
    ns: argparse.Namespace,
    on_ready: Callable[[HttpFrontend, ModelManager], None] | None = None,
) -> None:
    """Run the frontend until the runtime shuts down."""
    models = ModelManager()
    frontend = HttpFrontend(frontend_config(ns), models)
    # One /metrics page: the router's and request plane's metrics live on the runtime.
    frontend.metrics.registry.register(RegistryForwarder(runtime.metrics_registry))
    m = frontend.metrics
    migration = MigrationSettings(
        ns.migration_limit, m.count_migration, m.count_stall_migration,
        stalls=stall_config_from_args(ns), canary=canary_config_from_args(ns),
        on_stall=m.count_stall, on_canary_failure=m.count_canary_failure)
    only = ".".join(parse_endpoint_path(ns.endpoint)) if ns.endpoint else None
    watcher = ModelWatcher(runtime, models, router_config(ns), migration=migration, endpoint=only,
                           grace_s=ns.model_grace_period, disagg=disagg_config(ns))
    tracing.setup_tracing(runtime.config, "kvflow-frontend")
    await _bind(frontend)
    planner = asyncio.ensure_future(frontend.planner_feed.follow(runtime.events))
    try:
        await watcher.start()
        log.info("frontend: listening on %s", frontend.base_url)
        if on_ready is not None:
            on_ready(frontend, models)
        await runtime.shutdown_event.wait()
    finally:
        await frontend.stop()
        await cancel_and_wait(planner)
        await watcher.close()
        tracing.shutdown_tracing()


async def _bind(frontend: HttpFrontend) -> None:
    try:
        await frontend.start()
    except OSError as exc:
        if is_addr_in_use(exc):
            raise port_in_use("HTTP", frontend.config.host, frontend.config.port, "--http-port") from None
        raise


class RegistryForwarder:
    """A prometheus collector that yields another registry's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("kvflow frontend", "The OpenAI-compatible HTTP frontend: serves every model "
                        "its workers register in discovery.")
    add_frontend_args(parser)
    add_runtime_args(parser)
    return parser


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    with config_section(parser, "runtime"):
        add_config_args(parser.add_argument_group("runtime (discovery, planes; every command)"),
                        RuntimeConfig)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    ns = parse_layered(build_parser(), argv)
    setup_logging()
    install_uvloop()
    asyncio.run(run_with_runtime(serve_frontend, config_from_args(RuntimeConfig, "runtime", ns), ns))
    return 0
