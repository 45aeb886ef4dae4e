"""`@worker()`: run `async def main(runtime)` with a runtime, uvloop and signals."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from kvflow.runtime.config import RuntimeConfig
from kvflow.runtime.logs import setup_logging
from kvflow.runtime.runtime import DistributedRuntime

log = logging.getLogger(__name__)


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def run_with_runtime(
    main: Callable[..., Awaitable[Any]], config: RuntimeConfig | None, *args: Any, **kwargs: Any
) -> Any:
    """Start a runtime, run main(runtime, ...), shut down gracefully on SIGINT/SIGTERM."""
    runtime = DistributedRuntime(config)
    await runtime.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, runtime.initiate_shutdown)
    try:
        return await main(runtime, *args, **kwargs)
    finally:
        await runtime.shutdown()


def worker(
    config: RuntimeConfig | None = None,
) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]:
    """Decorate `async def main(runtime)`; calling the result runs the process."""

    def decorate(main: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> Any:
            setup_logging()
            install_uvloop()
            return asyncio.run(run_with_runtime(main, config, *args, **kwargs))

        return run

    return decorate
