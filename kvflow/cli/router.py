"""`kvflow router`: the standalone KV-aware router service (shared by several frontends)."""

from __future__ import annotations

import asyncio

from kvflow.cli.frontend import add_runtime_args
from kvflow.cli.help import new_parser
from kvflow.router.config import add_router_args, config_from_args
from kvflow.router.service import RouterWiring, serve_router
from kvflow.runtime import DistributedRuntime
from kvflow.runtime.config import RuntimeConfig
from kvflow.runtime.config import config_from_args as runtime_from_args
from kvflow.runtime.flags import config_section, parse_layered
from kvflow.runtime.logs import setup_logging
from kvflow.runtime.worker import install_uvloop, run_with_runtime


def main(argv: list[str]) -> int:
    parser = new_parser("kvflow router", "The standalone KV-aware router service: several frontends "
                        "share its view of the workers' KV caches.")
    # These two are flags only: [router] in a config file is shared with the frontend's router.
    parser.add_argument("--worker-component", default="backend", help="component of the workers")
    parser.add_argument("--component", default="router", help="component this service serves as")
    with config_section(parser, "router"):
        add_router_args(parser)
    add_runtime_args(parser)
    ns = parse_layered(parser, argv)
    config = runtime_from_args(RuntimeConfig, "runtime", ns)
    wiring = RouterWiring(namespace=config.namespace, component=ns.worker_component)

    async def serve(runtime: DistributedRuntime) -> None:
        await serve_router(runtime, config_from_args(ns), wiring, component=ns.component)

    setup_logging()
    install_uvloop()
    asyncio.run(run_with_runtime(serve, config))
    return 0
