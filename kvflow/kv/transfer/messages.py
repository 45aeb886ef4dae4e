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
    # A tensor-parallel holder: the /dev/shm regions of ranks 1..N-1, each holding the next
    # `layout.num_kv_heads` KV heads (rank 0's is `shm_name`); pulled by "shm" (kv/heads.py).
    head_shards: list[str] = []


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


Reply = HoldReply | Chunk
