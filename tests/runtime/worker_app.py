"""A test worker process: serves `<ns>.test.generate` with scripted behaviours."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from kvflow.runtime import Context, DistributedRuntime, worker

STATE: dict[str, int] = {}


async def generate(request: dict, context: Context):
    op = request.get("op", "count")
    if op == "count":
        delay = request.get("delay", 0.0)
        for i in range(request["n"]):
            yield i
            if delay:
                await asyncio.sleep(delay)
    elif op == "whoami":
        yield STATE["instance_id"]
    elif op == "raise":
        yield "before"
        raise ValueError("boom from handler")
    elif op == "watch_stop":
        i = 0
        try:
            while not context.is_stopped():
                yield i
                i += 1
                await asyncio.sleep(0.01)
        finally:
            with open(request["report"], "w") as f:
                f.write(f"{time.monotonic()} {context.is_stopped()}")


@worker()
async def main(runtime: DistributedRuntime) -> None:
    STATE["instance_id"] = runtime.lease_id
    endpoint = runtime.namespace(runtime.config.namespace).component("test").endpoint("generate")
    print(f"READY {runtime.lease_id} pid={os.getpid()} py={sys.version_info[:2]}", flush=True)
    await endpoint.serve(generate)
    print("DRAINED", flush=True)


if __name__ == "__main__":
    main()
