"""The transfer agent of one worker: registers its KV once, serves holds, pulls from peers.

Holding side: blocks a prefill request leaves behind sit in a `HoldTable` under the
request's transfer id; the agent serves `<ns>.<component>.kv_transfer` (describe, read,
release) on the worker's instance and publishes its `AgentInfo` (layout, host, shm
region, backends) once under the worker's lease.

Pulling side, `pull(source, transfer_id, first_block, dst_blocks)`:
    peer info (discovery, cached) -> layout check (KvLayoutMismatch names both values)
    -> describe (the hold's block ids) -> merge runs -> backend pull (with a timeout)
    -> release (True proves the hold outlived the copy: the data is valid)
Any failure raises `TransferFailed`; the caller recomputes.

Tensor parallel (either side): an engine's KV is one memory per rank, each holding a slice
of the KV heads. The agent runs in rank 0's process with every rank's memory opened there
(`KvShard`), serves them all and writes them all; backends re-slice the heads when the two
engines' splits differ (kvflow.kv.heads), so a TP=2 prefill engine feeds a TP=1 decode
engine and the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from kvflow.kv.blocks import KvBlockIO, pair_runs
from kvflow.kv.connector import KvShard
from kvflow.kv.heads import whole_layout
from kvflow.kv.layout import KvLayoutMismatch, check_compatible
from kvflow.kv.transfer.backends import (
    PullJob,
    backend_names,
    choose_backend,
    get_backend,
)
from kvflow.kv.transfer.holds import HoldTable
from kvflow.kv.transfer.messages import (
    AgentInfo,
    Chunk,
    HoldReply,
    Reply,
    TransferRequest,
    agent_key,
)
from kvflow.kv.transfer.metrics import TransferMetrics, metrics_for
from kvflow.llm.protocol import KvTransferStats
from kvflow.runtime import Context, DistributedRuntime

log = logging.getLogger(__name__)
ENDPOINT = "kv_transfer"


class TransferFailed(Exception):
    """A pull did not complete with valid data; the message says why (the request recomputes)."""


@dataclass(frozen=True)
class TransferConfig:
    lease_s: float = 30.0  # a hold nobody pulls is released after this long
    timeout_s: float = 30.0  # one pull, describe to release
    backends: tuple[str, ...] = ("cuda_ipc", "shm", "tcp")  # preference order
    chunk_bytes: int = 4 << 20  # tcp: bytes per streamed chunk (at least one block)


def host_id() -> str:
    """Same on two processes of one host (and boot), different across hosts."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class TransferAgent:
    """One worker's KV on the transfer plane (holding and pulling side)."""

    def __init__(
        self, runtime: DistributedRuntime, component: str, worker_id: int, io: KvBlockIO,
        on_release: Callable[[list[int]], None], *, shm_name: str | None = None,
        config: TransferConfig | None = None, metrics: TransferMetrics | None = None,
        head_shards: tuple[KvShard, ...] = (),
    ) -> None:
        self.runtime = runtime
        self.config = config or TransferConfig()
        self.io = io
        # Tensor parallel: every rank's KV memory, rank 0's (`io`) first; pulls write them all.
        self.shard_ios: list[KvBlockIO] = [io, *(s.io for s in head_shards)]
        self.namespace = runtime.config.namespace
        self.holds = HoldTable(self.config.lease_s, on_release)
        self.metrics = metrics or metrics_for(runtime.metrics_registry)
        self.info = self._describe(f"{self.namespace}.{component}.{ENDPOINT}", worker_id, shm_name,
                                   head_shards)
        self._peers: dict[int, AgentInfo] = {}
        self._clients: dict[str, Any] = {}
        self._tasks: list[asyncio.Task] = []
        self._warned_tcp = False

    def _describe(self, endpoint: str, worker_id: int, shm_name: str | None,
                  head_shards: tuple[KvShard, ...]) -> AgentInfo:
        # Another rank's memory is published only when every rank's is (else peers would
        # see part of the heads): a backend then serves only if it has all of them.
        names = [s.shm_name for s in head_shards if s.shm_name is not None]
        handles = [s.cuda_ipc for s in head_shards if s.cuda_ipc is not None]
        info = AgentInfo(worker_id, endpoint, self.io.layout, host_id(), [], shm_name,
                         shards=1 + len(head_shards),
                         head_shards=names if len(names) == len(head_shards) else [],
                         cuda_ipc_shards=handles if len(handles) == len(head_shards) else [])
        served: list[str] = []
        for name in self.config.backends:
            published = get_backend(name).publish(info, self.io) if name in backend_names() else None
            if published is not None:
                info = published
                served.append(name)
        return msgspec.structs.replace(info, backends=served)

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Publish this agent's info under the lease and serve the transfer endpoint."""
        endpoint = self.runtime.endpoint(self.info.endpoint)
        self._tasks.append(asyncio.ensure_future(endpoint.serve(
            self._handle, instance_id=self.info.worker_id, request_type=TransferRequest)))
        self._tasks.append(asyncio.ensure_future(self._expire_loop()))
        await self.runtime.discovery.put(
            agent_key(self.namespace, self.info.worker_id), msgspec.msgpack.encode(self.info))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in self._clients.values():
            await client.close()
        self.holds.release_all()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.config.lease_s / 4, 0.05))
            expired = self.holds.expire()
            if expired:
                log.warning("kv transfer: released %d holds nobody pulled within %.0f s",
                            expired, self.config.lease_s)

    # ---- holding side -----------------------------------------------------------------

    async def _handle(self, request: TransferRequest, context: Context) -> AsyncIterator[Reply]:
        hold = self.holds.get(request.transfer_id)
        if request.op == "release":
            yield HoldReply(self.holds.release(request.transfer_id))
        elif hold is None:
            yield HoldReply(False)
        elif request.op == "describe":
            yield HoldReply(True, hold.block_ids, hold.num_tokens)
        elif request.op == "read":
            for chunk in self._chunks(request, set(hold.block_ids)):
                yield chunk
        else:
            raise ValueError(f"unknown KV transfer op {request.op!r}")

    def _chunks(self, request: TransferRequest, held: set[int]) -> list[Chunk]:
        """The runs as chunks; tensor parallel: each position once per rank, rank order."""
        per_chunk = max(1, self.config.chunk_bytes // self.io.layout.block_bytes)
        out: list[Chunk] = []
        for src, count in request.runs:
            if not held.issuperset(range(src, src + count)):
                raise ValueError(f"blocks {src}..{src + count - 1} are not held for this transfer")
            for at in range(src, src + count, per_chunk):
                n = min(per_chunk, src + count - at)
                out.extend(Chunk(at, n, io.read_run(at, n), shard)
                           for shard, io in enumerate(self.shard_ios))
        return out

    # ---- pulling side -----------------------------------------------------------------

    async def pull(
        self, source: int, transfer_id: str, first_block: int, dst_blocks: list[int]
    ) -> KvTransferStats:
        """Copy the hold's blocks first_block.. into `dst_blocks`; raises TransferFailed."""
        started = time.perf_counter()
        try:
            stats = await asyncio.wait_for(
                self._pull(source, transfer_id, first_block, dst_blocks), self.config.timeout_s)
        except asyncio.TimeoutError:
            raise self._failed("timeout", f"the pull from worker {source:x} took over "
                               f"{self.config.timeout_s:.0f} s") from None
        except KvLayoutMismatch as exc:
            log.error("kv transfer refused: %s", exc)
            raise self._failed("layout", str(exc)) from exc
        except TransferFailed:
            raise
        except Exception as exc:  # the peer died, the stream broke, ...
            raise self._failed("error", f"pull from worker {source:x} failed: {exc!r}") from exc
        stats.seconds = time.perf_counter() - started
        self.metrics.moved(stats.backend, stats.bytes, stats.blocks, stats.seconds)
        return stats

    async def _pull(
        self, source: int, transfer_id: str, first_block: int, dst_blocks: list[int]
    ) -> KvTransferStats:
        remote = await self._peer(source)
        # Tensor parallel on either side: the heads of all ranks together must match.
        check_compatible(whole_layout(self.io.layout, len(self.shard_ios)),
                         whole_layout(remote.layout, remote.shards), f"worker {remote.worker_id:x}")
        described = await self._one(remote, TransferRequest("describe", transfer_id))
        src = described.block_ids[first_block : first_block + len(dst_blocks)]
        if not described.held or len(src) < len(dst_blocks):
            raise self._failed("not_held", f"worker {remote.worker_id:x} holds no KV for "
                               f"{transfer_id} (its lease ran out, or it never had it)")
        backend = choose_backend(self.config.backends, self.info, remote)
        self._note_backend(backend, remote)
        job = PullJob(self.io, self.info, remote, transfer_id, pair_runs(src, dst_blocks),
                      lambda r: self._call(remote, r), self.shard_ios)
        nbytes = await get_backend(backend).pull(job)
        released = await self._one(remote, TransferRequest("release", transfer_id))
        if not released.held:
            raise self._failed("expired", "the hold ended during the copy; the data is not trusted")
        return KvTransferStats(bytes=nbytes, blocks=len(dst_blocks), backend=backend)

    def _note_backend(self, backend: str, remote: AgentInfo) -> None:
        gpus = "cuda" in self.io.layout.device and "cuda" in remote.layout.device
        if backend == "tcp" and gpus:
            self.metrics.tcp_between_gpus.inc()
            if not self._warned_tcp:
                self._warned_tcp = True
                log.warning("kv transfer: GPU KV from worker %x moves over TCP (slow); "
                            "same-host GPUs can use cuda_ipc", remote.worker_id)

    def _failed(self, reason: str, message: str) -> TransferFailed:
        self.metrics.failures.labels(reason).inc()
        return TransferFailed(message)

    async def _peer(self, worker_id: int) -> AgentInfo:
        info = self._peers.get(worker_id)
        if info is None:
            raw = await self.runtime.discovery.get(agent_key(self.namespace, worker_id))
            if raw is None:
                raise self._failed("no_agent", f"worker {worker_id:x} has no KV transfer agent "
                                   "in discovery (gone, or not a prefill worker)")
            info = self._peers[worker_id] = msgspec.msgpack.decode(raw, type=AgentInfo)
        return info

    async def _client(self, endpoint: str) -> Any:
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = await self.runtime.endpoint(endpoint).client(Reply)
        return client

    async def _call(self, remote: AgentInfo, request: TransferRequest) -> AsyncIterator[Reply]:
        client = await self._client(remote.endpoint)
        if remote.worker_id not in client.instances:
            await client.wait_for_instances(timeout=self.config.timeout_s)
        async for reply in client.direct(request, remote.worker_id):
            yield reply

    async def _one(self, remote: AgentInfo, request: TransferRequest) -> HoldReply:
        async for reply in self._call(remote, request):
            if isinstance(reply, HoldReply):
                return reply
        raise TransferFailed(f"worker {remote.worker_id:x} sent no reply to {request.op}")

    async def release(self, source: int, transfer_id: str) -> bool:
        """Tell the holder it may free a transfer's blocks; whether it still held them."""
        remote = await self._peer(source)
        return (await self._one(remote, TransferRequest("release", transfer_id))).held
