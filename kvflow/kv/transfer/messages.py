"""Messages of the KV transfer plane: an agent's published metadata, requests and replies.

An agent publishes `AgentInfo` once, under its worker's lease, at
`v1/kv_agents/<namespace>/<worker hex>`; a peer reads it to learn the layout, the
host, the shared-memory region and the endpoint to call. Requests then carry only a
transfer id and block ids (as runs).
"""

from __future__ import annotations

import msgspec

from kvflow.kv.layout import KvLayout

AGENTS_PREFIX = "v1/kv_agents/"


def agent_key(namespace: str, worker_id: int) -> str:
    return f"{AGENTS_PREFIX}{namespace}/{worker_id:016x}"


class AgentInfo(msgspec.Struct, frozen=True):
    """How to reach one worker's KV: published once per worker."""

    worker_id: int
    endpoint: str  # "ns.component.kv_transfer", served on instance `worker_id`
    layout: KvLayout
    host_id: str  # equal on two workers of one host (boot id + hostname)
    backends: list[str]  # the backends this agent serves, best first
    shm_name: str | None = None  # /dev/shm region holding the KV (backend "shm")
    cuda_ipc: list[bytes | int] | None = None  # torch CUDA IPC handle of the KV (backend "cuda_ipc")
    # Tensor parallel: the engine's KV is `shards` memories (one per rank), rank r holding KV
    # heads r*H/N.. of every layer, each shaped like `layout` (rank 0's). Peers re-slice heads
    # to their own split (kv/heads.py). The other ranks' memories, for "shm" their /dev/shm
    # regions and for "cuda_ipc" their handles (rank 0's are `shm_name` / `cuda_ipc`);
    # "tcp" streams every rank's run (Chunk.shard).
    shards: int = 1
    head_shards: list[str] = []
    cuda_ipc_shards: list[list[bytes | int]] = []


class TransferRequest(msgspec.Struct, frozen=True):
    """op "describe": the hold's blocks; "read": stream `runs` (src start, count) as chunks;
    "release": drop the hold (reply says whether it was still held: validation)."""

    op: str
    transfer_id: str
    runs: list[tuple[int, int]] = []


class HoldReply(msgspec.Struct, tag="hold"):
    held: bool
    block_ids: list[int] = []
    num_tokens: int = 0


class Chunk(msgspec.Struct, tag="chunk"):
    src: int  # first source block of this piece
    count: int
    data: bytes
    shard: int = 0  # tensor parallel: whose KV heads (a position's shards come 0..N-1 in a row)


Reply = HoldReply | Chunk
