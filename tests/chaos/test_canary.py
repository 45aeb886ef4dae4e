"""The canary: a worker that accepts request-plane connections but never answers is
taken out of rotation before any user request reaches it."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

from kvflow.runtime import codec
from kvflow.runtime.codec import FrameKind
from kvflow.runtime.component import Instance
from kvflow.runtime.discovery.file import FileDiscovery

from .test_stalls import frontend_metric


class SilentWorker(asyncio.Protocol):
    """Accepts connections and reads frames; answers nothing, ever (a hung process)."""

    frames: Counter[int] = Counter()
    connections = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        SilentWorker.connections += 1
        self.parser = codec.FrameParser()
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for _version, kind, _stream, _payload in self.parser.feed(data):
            SilentWorker.frames[kind] += 1


async def test_canary_takes_a_silent_worker_out_of_rotation(chaos) -> None:
    chaos.frontend("--router-mode", "round-robin", "--canary-period", "0.3",
                   "--canary-timeout", "0.5")
    chaos.worker()
    await chaos.wait_workers(1)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SilentWorker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = chaos.env
    discovery = FileDiscovery(env["KVFLOW_DISCOVERY_PATH"], lease_ttl=1.0, poll_interval=0.05)
    await discovery.start()
    iid = random.getrandbits(62) | 1
    ns = env["KVFLOW_NAMESPACE"]
    inst = Instance(iid, ns, "backend", "generate", "127.0.0.1", port)
    await discovery.put(f"v1/instances/{ns}/backend/generate/{iid:016x}", codec.encode(inst))
    try:
        deadline = time.monotonic() + 20
        while frontend_metric(chaos.url, "kvflow_frontend_canary_failures_total") < 1:  # seen, and silent
            assert time.monotonic() < deadline, "the canary never gave up on the silent worker"
            await asyncio.sleep(0.05)
        assert SilentWorker.frames[FrameKind.HELLO] >= 2  # connect + at least one ping
        assert chaos.live_workers() == 1  # /health counts only workers that answer
        client = chaos.client(timeout=30)
        for i in range(6):  # round-robin would send every other one to it
            out = await client.completions.create(model="m", prompt=f"hello {i}", max_tokens=4)
            assert out.choices[0].finish_reason == "length"
        await client.close()
        assert SilentWorker.frames[FrameKind.REQUEST] == 0  # no user request reached it
        assert frontend_metric(chaos.url, "kvflow_frontend_stalls_total") == 0
    finally:
        await discovery.close()
        server.close()
