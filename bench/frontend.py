"""Benchmark the frontend's CPU per streamed token: real frontend + one echo worker process.

    python bench/frontend.py                    # concurrency 1, 32, 128; ISL 128, OSL 256
    python bench/frontend.py --concurrency 128 --profile /tmp/frontend.prof
    python bench/frontend.py --no-inproc --trials 3
    python bench/frontend.py --frontend-flags "--stall-timeout 0 --canary-period 0"

Processes: this one (the load generator: keep-alive HTTP/1.1 connections, a minimal
client that only looks for the first event and the end), the frontend (`kvflow frontend`'s
own serve function, discovering its worker through a private file-discovery dir), and ONE
`kvflow worker --engine echo --echo-repeat` (zero delay). The echo engine cycles the
128-token prompt until max_tokens=256, so ISL is 128 and OSL 256, one token per engine
output, every output crossing the TCP request plane. Two baselines are measured in the
same run, level by level: the bare asyncio SSE floor (parse the request, write OSL
pre-encoded chunks, one loop hop each) and, unless --no-inproc, the same frontend with an
in-process echo engine (no request plane). Reported per level and server: output
tokens/s, TTFT p50/p99, server CPU µs per output token (utime+stime from /proc, ÷ tokens),
server RSS, and the CPU ratio to the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvflow.testing.procs import Proc, runtime_env

if TYPE_CHECKING:
    from kvflow.frontend import HttpFrontend, ModelManager

MODEL = "bench-model"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVERS = ("frontend", "inproc", "baseline")


# ---------------------------------------------------------------- servers (child processes)


def serve_frontend(port_file: str, profile: str | None, flags: str = "") -> None:
    """`kvflow frontend` as it runs in production, plus a port file and optional cProfile."""
    from kvflow.cli.frontend import build_parser
    from kvflow.cli.frontend import serve_frontend as serve
    from kvflow.runtime.config import RuntimeConfig, config_from_args
    from kvflow.runtime.worker import install_uvloop, run_with_runtime

    ns = build_parser().parse_args(["--http-port", "0", *shlex.split(flags)])
    profiling = Profiling(profile)

    def ready(frontend: HttpFrontend, models: ModelManager) -> None:
        profiling.ready(frontend.address[1], port_file)  # type: ignore[index]

    install_uvloop()
    asyncio.run(run_with_runtime(serve, config_from_args(RuntimeConfig, "runtime", ns), ns, ready))
    profiling.dump()


async def serve_inproc(port_file: str, model_dir: str, profile: str | None) -> None:
    """The same HTTP frontend with an in-process echo engine (no request plane)."""
    from kvflow.frontend import FrontendConfig, HttpFrontend, ModelManager
    from kvflow.frontend.testing import EchoEngineClient
    from kvflow.llm.model_card import build_model_card

    models = ModelManager()
    engine = EchoEngineClient(repeat=True, keep_history=False)
    models.add_model(build_model_card(model_dir, model_name=MODEL), engine)
    frontend = HttpFrontend(FrontendConfig(port=0), models)
    _, port = await frontend.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    profiling = Profiling(profile)
    profiling.ready(port, port_file)
    await stop.wait()
    profiling.dump()
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
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    Profiling(None).ready(server.sockets[0].getsockname()[1], port_file)
    await stop.wait()
    server.close()


class Profiling:
    """cProfile on the CPU clock (waiting for a core is no cost), from SIGUSR1 to exit."""

    def __init__(self, path: str | None) -> None:
        import cProfile

        self.path = path
        self.profiler = cProfile.Profile(time.process_time) if path else None

    def ready(self, port: int, port_file: str) -> None:
        """Arm SIGUSR1 (sent after warm-up), then write the port file."""
        if self.profiler is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.profiler.enable)
        Path(port_file + ".tmp").write_text(str(port))
        os.replace(port_file + ".tmp", port_file)

    def dump(self) -> None:
        if self.profiler is not None and self.path:
            self.profiler.disable()
            self.profiler.dump_stats(self.path)


# ---------------------------------------------------------------- load generator


@dataclass
class LevelResult:
    server: str
    concurrency: int
    tokens: int
    seconds: float
    ttft: list[float]
    cpu_s: float
    sys_s: float
    rss_mb: float
    other_cpu_s: float = 0.0  # the worker's, for the real frontend

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_us_per_token(self) -> float:
        return self.cpu_s / self.tokens * 1e6

    def pct(self, q: float) -> float:
        data = sorted(self.ttft)
        return data[min(len(data) - 1, int(q * len(data)))] * 1e3


def request_bytes(port: int, prompt: str, osl: int, usage: bool = False) -> bytes:
    body: dict = {"model": MODEL, "prompt": prompt, "max_tokens": osl, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (port, len(data), data))


class LoadConnection(asyncio.Protocol):
    """One keep-alive connection sending the same request again and again.

    Every server sends exactly OSL tokens per request (checked once per server before
    the levels), so the client only looks for the first event (TTFT) and the end.
    """

    def __init__(self, request: bytes, on_done: asyncio.Queue) -> None:
        self.request = request
        self.done_queue = on_done
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.first_at = 0.0
        self.tail = b""
        self.body: list[bytes] | None = None  # set to [] to keep what arrives

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self) -> None:
        self.first_at, self.tail = 0.0, b""
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if not self.first_at and b"data: " in data:
            self.first_at = time.perf_counter()
        if self.body is not None:
            self.body.append(data)
        window = self.tail + data
        if window.endswith(b"0\r\n\r\n") and b"[DONE]" in window[-64:]:
            self.done_queue.put_nowait(self)
        self.tail = data[-64:]


async def _connect(port: int, n: int, req: bytes, done: asyncio.Queue) -> list[LoadConnection]:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(n):
        _, proto = await loop.create_connection(lambda: LoadConnection(req, done), "127.0.0.1", port)
        conns.append(proto)
    return conns


async def check_output(port: int, prompt: str, osl: int) -> int:
    """One request with usage: the stream must carry OSL tokens. Returns the prompt tokens."""
    done: asyncio.Queue[LoadConnection] = asyncio.Queue()
    (conn,) = await _connect(port, 1, request_bytes(port, prompt, osl, usage=True), done)
    conn.body = []
    conn.send()
    await asyncio.wait_for(done.get(), 30)
    conn.transport.close()  # type: ignore[union-attr]
    text = b"".join(conn.body).decode()
    usage = [json.loads(line[6:])["usage"] for line in text.splitlines()
             if line.startswith("data: {") and '"usage":{' in line]
    if not usage or usage[-1]["completion_tokens"] != osl:
        raise RuntimeError(f"server did not stream {osl} tokens: {text[-400:]}")
    return int(usage[-1]["prompt_tokens"])


async def run_level(server: str, port: int, pids: list[int], concurrency: int, requests: int,
                    req: bytes, osl: int) -> LevelResult:
    done: asyncio.Queue[LoadConnection] = asyncio.Queue()
    conns = await _connect(port, concurrency, req, done)
    await _drive(conns, done, concurrency, [])  # warm-up: one request per connection
    ttft: list[float] = []
    cpu0, t0 = [_cpu_seconds(p) for p in pids], time.perf_counter()
    await _drive(conns, done, requests, ttft)
    seconds = time.perf_counter() - t0
    cpu = [_cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
    sys_s = cpu[0].system
    for c in conns:
        c.transport.close()  # type: ignore[union-attr]
    return LevelResult(server, concurrency, requests * osl, seconds, ttft, cpu[0].total, sys_s,
                       _rss_mb(pids[0]), sum(c.total for c in cpu[1:]))


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


@dataclass(frozen=True)
class CpuTimes:
    """utime and stime of a process, in seconds."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user - other.user, self.system - other.system)


def _cpu_seconds(pid: int) -> CpuTimes:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return CpuTimes(int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------- orchestration


@dataclass
class Stack:
    """The server processes of one run, sharing a private discovery dir."""

    args: argparse.Namespace
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kvflow-bench-")))
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    worker: Proc | None = None

    def __post_init__(self) -> None:
        from kvflow.testing.tokenizer import make_model_dir

        self.model_dir = make_model_dir(self.root / "model", max_position_embeddings=8192)
        self.env = runtime_env(discovery="file", discovery_path=self.root / "discovery",
                               namespace="bench" + uuid.uuid4().hex[:6])

    def start(self, servers: list[str]) -> None:
        for kind in servers:
            self.procs[kind] = self._server(kind)
        if "frontend" in servers:
            self.worker = Proc([sys.executable, "-m", "kvflow.cli.main", "worker", "--engine", "echo",
                                "--echo-repeat", "--model-path", str(self.model_dir),
                                "--model-name", MODEL], self.env, self.root / "worker.log")
        for kind in servers:
            self.ports[kind] = self._wait_port(kind)
        if "frontend" in servers:
            self._wait_model(self.ports["frontend"])

    def pids(self, kind: str) -> list[int]:
        return [self.procs[kind].pid] + ([self.worker.pid] if kind == "frontend" and self.worker
                                         else [])

    def _server(self, kind: str) -> Proc:
        cmd = [sys.executable, __file__, "--serve", kind, "--port-file", str(self.root / kind),
               "--osl", str(self.args.osl), "--model-dir", str(self.model_dir)]
        if kind == "frontend" and self.args.frontend_flags:
            cmd += [f"--frontend-flags={self.args.frontend_flags}"]
        if self.args.profile and kind == self.args.profile_server:
            cmd += ["--profile", self.args.profile]
        return Proc(cmd, self.env, self.root / f"{kind}.log")

    def _wait_port(self, kind: str) -> int:
        path, deadline = self.root / kind, time.time() + 60
        while not path.exists():
            if not self.procs[kind].alive() or time.time() > deadline:
                raise RuntimeError(f"{kind} did not start:\n{self.procs[kind].output()[-3000:]}")
            time.sleep(0.05)
        return int(path.read_text())

    def _wait_model(self, port: int) -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
                if MODEL in r.read().decode():
                    return
            time.sleep(0.1)
        worker = self.worker.output()[-3000:] if self.worker else ""
        raise RuntimeError(f"the frontend never listed the worker's model:\n{worker}")

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate(30)
            proc.stop()
        if self.worker is not None:
            self.worker.stop()


def prompt_of(model_dir: Path, isl: int) -> str:
    """Text that the model's tokenizer turns into (about) `isl` tokens."""
    from kvflow.llm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    words = "the quick brown fox jumps over the lazy dog while serving many users at once "
    return tok.decode(tok.encode(words * isl)[:isl])


async def bench(stack: Stack, servers: list[str]) -> list[LevelResult]:
    args = stack.args
    prompt = prompt_of(stack.model_dir, args.isl)
    for kind in (s for s in servers if s != "baseline"):
        isl = await check_output(stack.ports[kind], prompt, args.osl)
        print(f"{kind}: {isl} prompt tokens, {args.osl} output tokens per request checked")
    results = []
    for c in args.concurrency:
        requests = max(args.requests, c * args.rounds)
        if args.profile:
            stack.procs[args.profile_server].signal(signal.SIGUSR1)
        for _ in range(args.trials):
            for kind in servers:
                req = request_bytes(stack.ports[kind], prompt, args.osl)
                results.append(await run_level(kind, stack.ports[kind], stack.pids(kind), c,
                                               requests, req, args.osl))
    return results


def report(results: list[LevelResult], trials: int) -> None:
    """One row per (level, server): the trial with the median CPU per token."""
    print(f"{'conc':>5} {'server':>9} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} "
          f"{'cpu us/tok':>10} {'sys %':>6} {'x floor':>8} {'rss MB':>7} {'worker us/tok':>13}")
    for c in sorted({r.concurrency for r in results}):
        rows = {}
        for kind in SERVERS:
            runs = sorted((r for r in results if r.concurrency == c and r.server == kind),
                          key=lambda r: r.cpu_us_per_token)
            if runs:
                rows[kind] = runs[len(runs) // 2]
        floor = rows.get("baseline")
        for kind, r in rows.items():
            ratio = r.cpu_us_per_token / floor.cpu_us_per_token if floor else float("nan")
            worker = f"{r.other_cpu_s / r.tokens * 1e6:>13.2f}" if r.other_cpu_s else ""
            print(f"{c:>5} {kind:>9} {r.tokens_per_s:>8.0f} {r.pct(0.5):>8.2f}m "
                  f"{r.pct(0.99):>8.2f}m {r.cpu_us_per_token:>10.2f} "
                  f"{100 * r.sys_s / max(r.cpu_s, 1e-9):>6.0f} {ratio:>7.2f}x "
                  f"{r.rss_mb:>7.1f} {worker}")
    if trials > 1:
        print(f"(median of {trials} trials by cpu us/tok)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 32, 128])
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=256)
    p.add_argument("--requests", type=int, default=200, help="minimum requests per level")
    p.add_argument("--rounds", type=int, default=6, help="requests per connection per level")
    p.add_argument("--trials", type=int, default=1, help="runs per level and server")
    p.add_argument("--no-inproc", action="store_true", help="skip the in-process-engine baseline")
    p.add_argument("--profile", help="cProfile one server (after warm-up) into this file")
    p.add_argument("--profile-server", choices=SERVERS, default="frontend")
    p.add_argument("--frontend-flags", default="", help="extra `kvflow frontend` flags")
    p.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return _serve(args)
    servers = [s for s in SERVERS if not (s == "inproc" and args.no_inproc)]
    stack = Stack(args)
    try:
        stack.start(servers)
        import uvloop

        results = uvloop.run(bench(stack, servers))
    finally:
        stack.stop()
    report(results, args.trials)
    if args.profile:
        import pstats

        pstats.Stats(args.profile).sort_stats("tottime").print_stats(30)
    first = [r for r in results if r.server == "frontend" and r.concurrency == args.concurrency[0]]
    if first:
        pooled = statistics.median(t for r in first for t in r.ttft) * 1e3
        trials = ", ".join(f"{r.pct(0.5):.2f}" for r in first)
        print(f"frontend TTFT p50 at c={args.concurrency[0]}: {pooled:.2f} ms over "
              f"{len(first)} trials (per trial: {trials} ms)")


def _serve(args: argparse.Namespace) -> None:
    import uvloop

    if args.serve == "frontend":
        serve_frontend(args.port_file, args.profile, args.frontend_flags)
    elif args.serve == "inproc":
        uvloop.run(serve_inproc(args.port_file, args.model_dir, args.profile))
    else:
        uvloop.run(serve_baseline(args.port_file, args.osl))


if __name__ == "__main__":
    main()
