"""Replica sync: router replicas share their routing decisions so their load views agree.

Each replica publishes a `RoutingSyncMessage` when it routes a request, when the
request's prefill ends and when it finishes; peers apply them to their `ActiveLoad`
under a key scoped by the publishing replica, book the routed prompt's new blocks as
pending on the chosen worker, and follow its session to that worker. The event-plane transport is wired by the
caller (`ROUTER_SYNC_SUBJECT`, payloads from `encode_sync` / `decode_sync`).
"""

from __future__ import annotations

from typing import Literal

import msgspec

ROUTER_SYNC_SUBJECT = "router_sync"

SyncKind = Literal["added", "prefill_done", "freed"]


class RoutingSyncMessage(msgspec.Struct, omit_defaults=True):
    replica_id: str
    request_id: str
    kind: SyncKind
    worker_id: int = 0
    prefill_tokens: int = 0
    decode_blocks: int = 0
    # "added": the routed prompt's block hashes the chosen worker will newly store (all of
    # them in approximate mode), so peers' approximate index or pending blocks learn them.
    block_hashes: list[int] = []
    # "added" with a session key: the session's history is now on `worker_id`, covering
    # `session_blocks` full prompt blocks, the last of which hashes to `session_hash`.
    session_id: str = ""
    session_blocks: int = 0
    session_hash: int = 0


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(RoutingSyncMessage)


def encode_sync(message: RoutingSyncMessage) -> bytes:
    return _ENCODER.encode(message)


def decode_sync(payload: bytes) -> RoutingSyncMessage:
    return _DECODER.decode(payload)


def remote_key(replica_id: str, request_id: str) -> str:
    """The `ActiveLoad` key of a request routed by another replica."""
    return f"{replica_id}/{request_id}"
