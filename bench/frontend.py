"""Benchmark the HTTP frontend's cost per streamed token against a bare SSE server (the floor).

    python bench/frontend.py                       # concurrency 1, 32, 128; ISL 128, OSL 256
    python bench/frontend.py --concurrency 128 --profile /tmp/frontend.prof

Each server runs in its own process; the load comes from this process over keep-alive
HTTP/1.1 connections, with a minimal client (a substring test per read) so the client
is not what is measured. The frontend serves a zero-delay echo-style engine
that yields OSL tokens one at a time (one event-loop hop per token, like tokens
arriving from a worker); the baseline writes OSL pre-encoded chunks with the same hop.
Reported per level: output tokens/s, TTFT p50/p99, server CPU µs per output token
(utime+stime from /proc), server RSS, and the frontend/baseline CPU ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MODEL = "bench-model"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- servers (child processes)


async def serve_frontend(port_file: str, profile: str | None) -> None:
    from kvflow.frontend import FrontendConfig, HttpFrontend, ModelManager
    from kvflow.frontend.testing import EchoEngineClient
    from kvflow.llm.model_card import build_model_card
    from kvflow.testing.tokenizer import make_model_dir

    model_dir = make_model_dir(tempfile.mkdtemp(prefix="kvflow-bench-"),
                               max_position_embeddings=8192)
    models = ModelManager()
    engine = EchoEngineClient(repeat=True, keep_history=False)
    models.add_model(build_model_card(str(model_dir), model_name=MODEL), engine)
    frontend = HttpFrontend(FrontendConfig(port=0), models)
    _, port = await frontend.start()
    await _run_until_signalled(port, port_file, profile)
    await frontend.stop(grace_s=0.1)


async def serve_baseline(port_file: str, osl: int) -> None:
    """The floor: parse just enough HTTP, then write OSL pre-encoded SSE chunks."""
    piece = b'data: {"choices":[{"index":0,"delta":{"content":" tok"}}]}\n\n'
    chunk = b"%x\r\n%b\r\n" % (len(piece), piece)
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    tail = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"

    class Bare(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = int(self.buf[: end].lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            asyncio.get_running_loop().create_task(self.stream())

        async def stream(self) -> None:
            self.t.write(head)  # type: ignore[attr-defined]
            for _ in range(osl):
                await asyncio.sleep(0)
                self.t.write(chunk)  # type: ignore[attr-defined]
            self.t.write(tail)  # type: ignore[attr-defined]

    server = await asyncio.get_running_loop().create_server(Bare, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await _run_until_signalled(port, port_file, None)
    server.close()


async def _run_until_signalled(port: int, port_file: str, profile: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    _write_port(port_file, port)
    loop.add_signal_handler(signal.SIGUSR1, lambda: profiler and profiler.enable())
    await stop.wait()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)  # type: ignore[arg-type]


def _write_port(port_file: str, port: int) -> None:
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)


# ---------------------------------------------------------------- load generator


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttft: list[float]
    cpu_s: float
    sys_s: float
    client_cpu_s: float
    rss_mb: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_us_per_token(self) -> float:
        return self.cpu_s / self.tokens * 1e6

    def pct(self, q: float) -> float:
        data = sorted(self.ttft)
        return data[min(len(data) - 1, int(q * len(data)))] * 1e3


def request_bytes(port: int, prompt: str, osl: int) -> bytes:
    body = json.dumps({
        "model": MODEL, "prompt": prompt, "max_tokens": osl, "stream": True, "ignore_eos": True,
    }).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (port, len(body), body))


class LoadConnection(asyncio.Protocol):
    """One keep-alive connection sending the same request again and again.

    Output tokens are known (the servers generate exactly OSL per request), so the client
    only looks for the first event (TTFT) and the end of the stream.
    """

    def __init__(self, request: bytes, on_done: asyncio.Queue) -> None:
        self.request = request
        self.done_queue = on_done
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.first_at = 0.0
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self) -> None:
        self.first_at, self.tail = 0.0, b""
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if not self.first_at and b"data: " in data:
            self.first_at = time.perf_counter()
        window = self.tail + data
        if window.endswith(b"0\r\n\r\n") and b"[DONE]" in window[-64:]:
            self.done_queue.put_nowait(self)
        self.tail = data[-64:]


async def run_level(port: int, pid: int, concurrency: int, requests: int, req: bytes,
                    osl: int, warmup: int) -> LevelResult:
    loop = asyncio.get_running_loop()
    done: asyncio.Queue[LoadConnection] = asyncio.Queue()
    conns = []
    for _ in range(concurrency):
        _, proto = await loop.create_connection(lambda: LoadConnection(req, done), "127.0.0.1",
                                                port)
        conns.append(proto)
    await _drive(conns, done, warmup * concurrency, [])
    ttft: list[float] = []
    (user0, sys0), t0, client0 = _cpu_seconds(pid), time.perf_counter(), time.process_time()
    await _drive(conns, done, requests, ttft)
    seconds, client = time.perf_counter() - t0, time.process_time() - client0
    user1, sys1 = _cpu_seconds(pid)
    tokens = requests * osl
    for c in conns:
        c.transport.close()  # type: ignore[union-attr]
    return LevelResult(concurrency, requests, tokens, seconds, ttft, user1 + sys1 - user0 - sys0,
                       sys1 - sys0, client, _rss_mb(pid))


async def _drive(conns: list[LoadConnection], done: asyncio.Queue, total: int,
                 ttft: list[float]) -> None:
    """Keep every connection busy until `total` requests have finished."""
    started, finished = 0, 0
    for c in conns:
        if started < total:
            c.send()
            started += 1
    while finished < total:
        c = await done.get()
        finished += 1
        ttft.append(c.first_at - c.sent_at)
        if started < total:
            c.send()
            started += 1


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------- orchestration


def start_server(kind: str, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    port_file = tempfile.mktemp(prefix=f"kvflow-bench-{kind}-")
    cmd = [sys.executable, __file__, "--serve", kind, "--port-file", port_file,
           "--osl", str(args.osl)]
    if args.profile and kind == "frontend":
        cmd += ["--profile", args.profile]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 60
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{kind} server did not start (exit code {proc.poll()})")
        time.sleep(0.05)
    with open(port_file) as f:
        port = int(f.read())
    os.unlink(port_file)
    return proc, port


def prompt_of(isl: int) -> str:
    """Roughly `isl` tokens of text for the test tokenizer (2-3 characters a token)."""
    words = "the quick brown fox jumps over the lazy dog while serving many users at once "
    return (words * (isl // 8 + 1))[: isl * 3]


async def bench_server(kind: str, args: argparse.Namespace) -> list[LevelResult]:
    proc, port = start_server(kind, args)
    try:
        req = request_bytes(port, prompt_of(args.isl), args.osl)
        results = []
        for c in args.concurrency:
            if args.profile and kind == "frontend":
                os.kill(proc.pid, signal.SIGUSR1)
            n = max(args.requests, c * args.rounds)
            results.append(await run_level(port, proc.pid, c, n, req, args.osl, warmup=1))
        return results
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def report(front: list[LevelResult], base: list[LevelResult]) -> None:
    print(f"{'conc':>5} {'server':>9} {'tok/s':>9} {'ttft p50':>9} {'ttft p99':>9} "
          f"{'cpu us/tok':>10} {'sys %':>6} {'client us/tok':>13} {'rss MB':>7}")
    for f, b in zip(front, base, strict=True):
        for name, r in (("frontend", f), ("baseline", b)):
            print(f"{r.concurrency:>5} {name:>9} {r.tokens_per_s:>9.0f} {r.pct(0.5):>8.2f}m "
                  f"{r.pct(0.99):>8.2f}m {r.cpu_us_per_token:>10.2f} "
                  f"{100 * r.sys_s / max(r.cpu_s, 1e-9):>6.0f} "
                  f"{r.client_cpu_s / r.tokens * 1e6:>13.2f} {r.rss_mb:>7.1f}")
        print(f"{'':>5} {'ratio':>9} {'':>9} {'':>9} {'':>9} "
              f"{f.cpu_us_per_token / b.cpu_us_per_token:>9.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 32, 128])
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=256)
    p.add_argument("--requests", type=int, default=400, help="minimum requests per level")
    p.add_argument("--rounds", type=int, default=8, help="requests per connection per level")
    p.add_argument("--profile", help="cProfile the frontend into this file")
    p.add_argument("--serve", choices=["frontend", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    import uvloop

    if args.serve == "frontend":
        uvloop.run(serve_frontend(args.port_file, args.profile))
        return
    if args.serve == "baseline":
        uvloop.run(serve_baseline(args.port_file, args.osl))
        return
    front = uvloop.run(bench_server("frontend", args))
    base = uvloop.run(bench_server("baseline", args))
    report(front, base)
    if args.profile:
        import pstats

        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    print(f"frontend ttft p50 at c={front[0].concurrency}: "
          f"{statistics.median(front[0].ttft) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
