"""Replay over HTTP: send each trace request to a frontend at its timestamp and time its stream.

One connection per request, HTTP/1.1, parsed with httptools (already a kvflow
dependency); the body is a streaming /v1/completions request whose prompt is token
ids, with `max_tokens` = the trace's output length and EOS ignored, so every
request produces exactly the trace's tokens. TTFT is the first content chunk;
ITL the mean gap after it.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from dataclasses import dataclass

import httptools

from kvflow.replay.report import RequestResult
from kvflow.replay.trace import TraceRequest, prompt_tokens


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    model: str
    api_key: str = ""

    @classmethod
    def from_url(cls, url: str, model: str, api_key: str = "") -> Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--url must look like http://HOST:PORT, got {url!r}")
        return cls(parts.hostname, parts.port or 80, model, api_key)


class _Stream:
    """httptools callbacks: status, and SSE events as they arrive."""

    def __init__(self) -> None:
        self.status = 0
        self.buffer = b""
        self.events: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.parser = httptools.HttpResponseParser(self)

    def on_status(self, _: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.buffer += body
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            self.events.put_nowait(event)

    def on_message_complete(self) -> None:
        if self.buffer.strip():
            self.events.put_nowait(self.buffer)
        self.events.put_nowait(None)


def _body(target: Target, req: TraceRequest, index: int) -> bytes:
    return json.dumps({
        "model": target.model, "prompt": prompt_tokens(req, index), "max_tokens": req.output_length,
        "ignore_eos": True, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()


async def send_one(target: Target, req: TraceRequest, index: int, timeout: float) -> RequestResult:
    sent = time.monotonic()
    try:
        first, last, tokens = await asyncio.wait_for(_exchange(target, req, index), timeout)
    except (OSError, TimeoutError, ValueError, httptools.HttpParserError) as exc:
        return RequestResult(req.arrival_s, float("inf"), 0.0, 0, f"{type(exc).__name__}: {exc}")
    itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return RequestResult(req.arrival_s, first - sent, itl, tokens)


async def _exchange(target: Target, req: TraceRequest, index: int) -> tuple[float, float, int]:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        body = _body(target, req, index)
        auth = f"authorization: Bearer {target.api_key}\r\n" if target.api_key else ""
        writer.write(f"POST /v1/completions HTTP/1.1\r\nhost: {target.host}\r\n{auth}"
                     f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                     + body)
        stream = _Stream()
        reading = asyncio.ensure_future(_pump(reader, stream))
        try:
            return await _consume(stream)
        finally:
            reading.cancel()
    finally:
        writer.close()


async def _pump(reader: asyncio.StreamReader, stream: _Stream) -> None:
    while data := await reader.read(65536):
        stream.parser.feed_data(data)
    stream.events.put_nowait(None)


async def _consume(stream: _Stream) -> tuple[float, float, int]:
    first = last = 0.0
    tokens = 0
    while (event := await stream.events.get()) is not None:
        if stream.status != 200:
            raise ValueError(f"HTTP {stream.status}: {event[:200]!r}")
        data = event.removeprefix(b"data: ").strip()
        if data == b"[DONE]" or not data:
            continue
        chunk = json.loads(data)
        if chunk.get("choices"):
            last = time.monotonic()
            first = first or last
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    if not first:
        raise ValueError(f"the stream ended without output (HTTP {stream.status})")
    return first, last, tokens


async def replay_http(trace: list[TraceRequest], target: Target,
                      timeout: float = 300.0) -> list[RequestResult]:
    """Send every request at its arrival time (from now); results in trace order."""
    start = time.monotonic()

    async def at_time(i: int, req: TraceRequest) -> RequestResult:
        await asyncio.sleep(max(0.0, start + req.arrival_s - time.monotonic()))
        return await send_one(target, req, i, timeout)

    return list(await asyncio.gather(*(at_time(i, r) for i, r in enumerate(trace))))
