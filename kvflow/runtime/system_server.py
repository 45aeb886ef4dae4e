"""A process's status port: GET /health, /live and /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from prometheus_client import generate_latest

from kvflow.runtime.errors import is_addr_in_use, port_in_use

if TYPE_CHECKING:
    from kvflow.runtime.runtime import DistributedRuntime


class SystemServer:
    def __init__(self, runtime: DistributedRuntime, host: str, port: int) -> None:
        self.runtime = runtime
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            if is_addr_in_use(exc):
                raise port_in_use("system status", self.host, self.port, "--system-port") from None
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _route(self, path: str) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if path == "/live":
            return 200, "application/json", b'{"status":"live"}'
        if path == "/health":
            ok = not self.runtime.shutdown_event.is_set()
            body = json.dumps(
                {
                    "status": "healthy" if ok else "shutting_down",
                    "instances": len(self.runtime._instance_keys),
                }
            ).encode()
            return (200 if ok else 503), "application/json", body
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", generate_latest(self.runtime.metrics_registry)
        return 404, "application/json", b'{"error":"not found"}'

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            status, ctype, body = self._route(parts[1] if len(parts) > 1 else "/")
            head = (
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
