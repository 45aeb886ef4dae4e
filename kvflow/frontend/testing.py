"""Test helpers: in-process EngineClients (echo, scripted) and a running frontend + client.

The engine clients are real implementations of the EngineClient contract (they honour
max_tokens, context stops and early close), just without a model behind them.
`start_served()` starts an HttpFrontend on a free port with an official `openai`
client pointed at it (the `openai` package is a test dependency, imported lazily).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.engine_client import EngineClient, EngineUnavailable
from kvflow.frontend.models import ModelManager
from kvflow.frontend.server import HttpFrontend
from kvflow.llm.model_card import ModelCard
from kvflow.llm.protocol import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineOutput,
    PreprocessedRequest,
)
from kvflow.runtime.context import Context


@dataclass
class EchoEngineClient:
    """Streams the prompt's tokens back one per output.

    `repeat=True` cycles the prompt until max_tokens (a stand-in for a model that never
    emits EOS). `cached_tokens` is reported on the first output. Every request and
    context is kept in `requests` / `contexts` for assertions.
    """

    delay_s: float = 0.0
    repeat: bool = False
    cached_tokens: int = 0
    workers: int = 1
    requests: list[PreprocessedRequest] = field(default_factory=list)
    contexts: list[Context] = field(default_factory=list)
    keep_history: bool = True

    def live_workers(self) -> int:
        return self.workers

    async def generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        if self.workers == 0:
            raise EngineUnavailable("echo engine has no workers")
        if self.keep_history:
            self.requests.append(request)
            self.contexts.append(context)
        prompt = request.token_ids
        limit = request.stop.max_tokens
        total = limit if self.repeat and limit is not None else len(prompt)
        if limit is not None:
            total = min(total, limit)
        cached = self.cached_tokens
        for i in range(total):
            await asyncio.sleep(self.delay_s)
            if context.is_stopped():
                yield EngineOutput(finish_reason=FINISH_CANCELLED)
                return
            finish = None
            if i == total - 1:
                finish = FINISH_LENGTH if limit is not None and total == limit else FINISH_STOP
            yield EngineOutput(token_ids=[prompt[i % len(prompt)]], finish_reason=finish,
                               cached_tokens=cached if i == 0 else None)
        if total == 0:
            yield EngineOutput(finish_reason=FINISH_STOP, cached_tokens=cached)


Script = Callable[[PreprocessedRequest], list[EngineOutput]]


@dataclass
class ScriptedEngineClient:
    """Streams outputs computed by `script(request)`; stops early when the context stops.

    `hold_open=True` keeps the stream open after the script (until the context stops),
    for tests of stop handling and disconnects.
    """

    script: Script
    delay_s: float = 0.0
    hold_open: bool = False
    workers: int = 1
    requests: list[PreprocessedRequest] = field(default_factory=list)
    contexts: list[Context] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    def live_workers(self) -> int:
        return self.workers

    async def generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        if self.workers == 0:
            raise EngineUnavailable("scripted engine has no workers")
        self.requests.append(request)
        self.contexts.append(context)
        try:
            for out in self.script(request):
                await asyncio.sleep(self.delay_s)
                if context.is_stopped():
                    yield EngineOutput(finish_reason=FINISH_CANCELLED)
                    return
                yield out
            if self.hold_open:
                await context.stopped()
                yield EngineOutput(finish_reason=FINISH_CANCELLED)
        finally:
            self.closed.append(request.request_id)


def tokens_script(
    token_ids: list[int], finish_reason: str | None = FINISH_STOP, **first: object
) -> Script:
    """A script emitting `token_ids` one per output, the last with `finish_reason` (None:
    no finish, for streams held open); `first` sets fields on the first output."""

    def script(request: PreprocessedRequest) -> list[EngineOutput]:
        outs = [EngineOutput(token_ids=[t]) for t in token_ids] or [EngineOutput()]
        outs[-1].finish_reason = finish_reason
        for key, value in first.items():
            setattr(outs[0], key, value)
        return outs

    return script


@dataclass
class Served:
    """A running frontend, its model manager and an AsyncOpenAI client for it."""

    frontend: HttpFrontend
    models: ModelManager
    client: Any  # openai.AsyncOpenAI
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add(self, card: ModelCard, engine: EngineClient) -> None:
        self.models.add_model(card, engine)

    async def close(self) -> None:
        await self.client.close()
        await self.frontend.stop(grace_s=0.5)


async def start_served(config: FrontendConfig | None = None, api_key: str = "unused") -> Served:
    from openai import AsyncOpenAI

    models = ModelManager()
    frontend = HttpFrontend(config or FrontendConfig(port=0), models)
    host, port = await frontend.start()
    client = AsyncOpenAI(base_url=f"http://{host}:{port}/v1", api_key=api_key, max_retries=0)
    return Served(frontend, models, client, host, port)


@dataclass
class RawResponse:
    """A response read off the wire by `raw_request` (chunked bodies are de-chunked)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)


async def raw_request(
    host: str, port: int, method: str, path: str, body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> RawResponse:
    """One HTTP/1.1 request on a fresh connection, for tests that need exact bytes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """Read one response (Content-Length, chunked, or until close) from `reader`."""
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.read()
    return RawResponse(status, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readline()
