"""Client half of the compat test: streams from the test worker, prints a verdict."""

from __future__ import annotations

import asyncio
import sys

from kvflow.runtime import DistributedRuntime, RuntimeConfig


async def main() -> None:
    runtime = await DistributedRuntime(RuntimeConfig.from_env()).start()
    try:
        ep = runtime.namespace(runtime.config.namespace).component("test").endpoint("generate")
        client = await ep.client()
        await client.wait_for_instances(timeout=30)
        items = [x async for x in client.round_robin({"op": "count", "n": 1000})]
        ok = items == list(range(1000))
        print(f"{'OK' if ok else 'MISMATCH'} received={len(items)} py={sys.version_info[:2]}", flush=True)
    finally:
        await runtime.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
