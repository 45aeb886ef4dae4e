"""`@worker()`: run `async def main(runtime)` with a runtime, uvloop and signals."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
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
    """Start a runtime, run main(runtime, ...), shut down gracefully on SIGINT/SIGTERM.

    In every state a signal ends the process promptly: while starting (nothing
    registered yet) main is cancelled at once; while serving, endpoints drain for up
    to `graceful_shutdown_timeout`; a second signal cancels main without waiting.
    Returns None when a signal ended main.
    """
    runtime = DistributedRuntime(config)
    body = asyncio.ensure_future(_start_and_run(runtime, main, args, kwargs))
    stopper = SignalStopper(runtime, body)
    stopper.install()
    try:
        return await body
    except asyncio.CancelledError:
        if not stopper.signalled:
            raise
        return None
    finally:
        stopper.uninstall()


async def _start_and_run(
    runtime: DistributedRuntime, main: Callable[..., Awaitable[Any]], args: tuple, kwargs: dict
) -> Any:
    try:
        await runtime.start()
        return await main(runtime, *args, **kwargs)
    finally:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(runtime.shutdown()), SHUTDOWN_CLOSE_TIMEOUT_S)


SHUTDOWN_CLOSE_TIMEOUT_S = 10.0


class SignalStopper:
    """SIGINT/SIGTERM → graceful shutdown; cancels main when there is nothing to drain."""

    def __init__(self, runtime: DistributedRuntime, body: asyncio.Future) -> None:
        self.runtime = runtime
        self.body = body
        self.signalled = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.on_signal, sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    def on_signal(self, sig: int) -> None:
        self.signalled += 1
        if self.signalled >= 3:
            log.warning("%s again: exiting now", signal.Signals(sig).name)
            os._exit(128 + sig)
        self.runtime.initiate_shutdown()
        if self.signalled >= 2 or not self.runtime.serving:
            self.body.cancel()
        else:
            grace = self.runtime.config.graceful_shutdown_timeout + SHUTDOWN_CLOSE_TIMEOUT_S
            asyncio.get_running_loop().call_later(grace, self.body.cancel)


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
