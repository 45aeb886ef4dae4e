"""Event planes: subject wildcards, in-process delivery, ZMQ across processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from kvflow.runtime import DistributedRuntime, RuntimeConfig
from kvflow.runtime.events.base import subject_matches


def test_subject_matching() -> None:
    assert subject_matches("a.b", "a.b") and not subject_matches("a.b", "a.c")
    assert subject_matches("a.*.c", "a.x.c") and not subject_matches("a.*.c", "a.x.y.c")
    assert subject_matches("a.>", "a.b.c") and not subject_matches("a.>", "a")
    assert not subject_matches("a.*", "a.b.c")


async def test_inproc_scoped_by_namespace() -> None:
    rt = await DistributedRuntime(RuntimeConfig(discovery="memory", event_plane="inproc")).start()
    mine = rt.namespace("one").events.subscribe("kv.*")
    other = rt.namespace("two").events.subscribe("kv.*")
    await rt.namespace("one").events.publish("kv.w1", b"hello")
    assert await asyncio.wait_for(mine.__anext__(), 1) == b"hello"
    await asyncio.sleep(0.05)
    assert other._queue.empty()
    await rt.shutdown()


PUBLISHER = textwrap.dedent("""
    import asyncio, sys
    from kvflow.runtime import DistributedRuntime, RuntimeConfig

    async def main():
        rt = await DistributedRuntime(RuntimeConfig.from_env()).start()
        for i in range(200):  # until the subscriber has connected (slow joiner)
            await rt.events.publish("metrics.w", str(i).encode())
            await asyncio.sleep(0.05)
        await rt.shutdown()

    asyncio.run(main())
""")


async def test_zmq_across_processes(file_cluster) -> None:
    rt = await DistributedRuntime(file_cluster.config()).start()
    sub = rt.events.subscribe("metrics.*")
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER], env=file_cluster.env())
    try:
        got = [int(await asyncio.wait_for(sub.__anext__(), 15)) for _ in range(5)]
        assert got == sorted(got) and len(set(got)) == 5
    finally:
        proc.kill()
        proc.wait()
        await rt.shutdown()
