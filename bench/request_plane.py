"""Request-plane benchmark: one worker process, one client process, TCP.

Measures streamed responses per second and round-trip latency (p50/p99) for a
small request at 1, 64 and 512 concurrent streams, and the same through a bare
asyncio baseline (length-prefixed frames, no kvflow) in the same run.

    python bench/request_plane.py [--responses 400000] [--pings 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from kvflow.runtime import DistributedRuntime, RuntimeConfig
from kvflow.runtime.worker import install_uvloop

FRAME = struct.Struct("!I")


# -- worker side ---------------------------------------------------------------------
async def stream_handler(request: dict, context):
    item = request.get("item", 1)
    for _ in range(request["n"]):
        yield item


async def serve_kvflow(config: RuntimeConfig) -> None:
    runtime = await DistributedRuntime(config).start()
    ep = runtime.endpoint("bench.rp.stream")
    print("READY", flush=True)
    await ep.serve(stream_handler)


class RawServer(asyncio.Protocol):
    """Baseline: request = u32 count; reply = count frames of a 1-byte msgpack int."""

    def connection_made(self, transport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 12:
            stream_id, n = struct.unpack_from("!QI", self.buf)
            self.buf = self.buf[12:]
            item = FRAME.pack(9) + struct.pack("!Q", stream_id) + b"\x01"
            self.t.write(item * n)


async def serve_raw(port_file: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawServer, "127.0.0.1", 0)
    with open(port_file, "w") as f:
        f.write(str(server.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()


# -- client side ---------------------------------------------------------------------
async def kvflow_client(config: RuntimeConfig, args: argparse.Namespace) -> dict:
    runtime = await DistributedRuntime(config).start()
    client = await runtime.endpoint("bench.rp.stream").client()
    await client.wait_for_instances(timeout=30)
    results = {}
    for conc in (1, 64, 512):
        per = max(1, args.responses // conc)

        async def one(per: int = per) -> int:
            n = 0
            async for _ in client.round_robin({"n": per}):
                n += 1
            return n

        await asyncio.gather(*(one(min(per, 100)) for _ in range(conc)))  # warm-up
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(conc)))
        rate = sum(counts) / (time.perf_counter() - t0)
        lats = await _latencies(lambda: _drain(client.round_robin({"n": 1})), conc, args.pings)
        results[conc] = (rate, *lats)
    await runtime.shutdown()
    return results


async def _drain(stream) -> None:
    async for _ in stream:
        pass


async def _latencies(call, conc: int, pings: int) -> tuple[float, float]:
    lats: list[float] = []

    async def loop(k: int) -> None:
        for _ in range(k):
            t0 = time.perf_counter()
            await call()
            lats.append(time.perf_counter() - t0)

    per = max(1, pings // conc)
    await asyncio.gather(*(loop(per) for _ in range(conc)))
    lats.sort()
    return statistics.median(lats) * 1e6, lats[int(len(lats) * 0.99) - 1] * 1e6


class RawClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiters: dict[int, list] = {}

    def connection_made(self, transport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= 13:
            (stream_id,) = struct.unpack_from("!Q", buf, pos + 4)
            pos += 13
            w = self.waiters[stream_id]
            w[0] -= 1
            if w[0] == 0:
                w[1].set_result(None)
        del buf[:pos]

    async def call(self, stream_id: int, n: int) -> int:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[stream_id] = [n, fut]
        self.t.write(struct.pack("!QI", stream_id, n))
        await fut
        del self.waiters[stream_id]
        return n


async def raw_client(port: int, args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(RawClient, "127.0.0.1", port)
    ids = iter(range(1, 1 << 62))
    results = {}
    for conc in (1, 64, 512):
        per = max(1, args.responses // conc)
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(proto.call(next(ids), per) for _ in range(conc)))
        rate = sum(counts) / (time.perf_counter() - t0)
        lats = await _latencies(lambda: proto.call(next(ids), 1), conc, args.pings)
        results[conc] = (rate, *lats)
    return results


# -- orchestration -------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", default="bench", choices=["bench", "kvflow-worker", "raw-worker"])
    parser.add_argument("--responses", type=int, default=400_000)
    parser.add_argument("--pings", type=int, default=4_000)
    parser.add_argument("--port-file", default="")
    args = parser.parse_args()
    install_uvloop()
    disc = os.environ.get("KVFLOW_DISCOVERY_PATH") or tempfile.mkdtemp(prefix="kvflow-bench-")
    config = RuntimeConfig(discovery="file", discovery_path=disc, event_plane="inproc",
                           namespace="bench")
    if args.role == "kvflow-worker":
        asyncio.run(serve_kvflow(config))
        return
    if args.role == "raw-worker":
        asyncio.run(serve_raw(args.port_file))
        return
    env = dict(os.environ, KVFLOW_DISCOVERY_PATH=disc)
    me = [sys.executable, __file__]
    worker = subprocess.Popen([*me, "--role", "kvflow-worker"], env=env, stdout=subprocess.PIPE)
    assert worker.stdout is not None and worker.stdout.readline().strip() == b"READY"
    port_file = os.path.join(disc, "raw-port")
    raw = subprocess.Popen([*me, "--role", "raw-worker", "--port-file", port_file], env=env)
    try:
        ours = asyncio.run(kvflow_client(config, args))
        while not os.path.exists(port_file) or not open(port_file).read():
            time.sleep(0.05)
        base = asyncio.run(raw_client(int(open(port_file).read()), args))
    finally:
        worker.terminate()
        raw.terminate()
    print(f"{'streams':>8} {'kvflow resp/s':>14} {'p50 us':>8} {'p99 us':>8} | "
          f"{'raw resp/s':>11} {'p50 us':>7} {'p99 us':>7} | {'rate ratio':>10} {'p50 ratio':>9}")
    for conc in (1, 64, 512):
        r, p50, p99 = ours[conc]
        br, bp50, bp99 = base[conc]
        print(f"{conc:>8} {r:>14,.0f} {p50:>8.0f} {p99:>8.0f} | {br:>11,.0f} {bp50:>7.0f} {bp99:>7.0f} | "
              f"{r / br:>10.2f} {p50 / bp50:>9.2f}")


if __name__ == "__main__":
    main()
