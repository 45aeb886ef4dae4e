"""vLLM's KV events (its ZMQ publisher's wire format) turned into kvflow `KvEvent`s with kvflow block hashes.

vLLM publishes multipart messages (topic, 8-byte big-endian sequence number,
msgpack `KVEventBatch`). Its block hashes are its own; the router hashes
prompts with `kvflow.llm.kv_hash`, so every stored block is re-hashed from its
token ids (chained from its parent's kvflow hash) and the vLLM → kvflow mapping
is kept so removals can be translated. The structs below mirror vLLM's
(`vllm/distributed/kv_events.py`) so this module needs no vLLM import.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from kvflow.llm.kv_events import (
    AllCleared,
    BlocksRemoved,
    BlocksStored,
    CachedBlock,
    CacheSnapshot,
    KvEvent,
    StoredBlock,
)
from kvflow.llm.kv_hash import chain_hash, local_block_hash

log = logging.getLogger(__name__)


class VllmBlockStored(msgspec.Struct, tag="BlockStored", forbid_unknown_fields=False):
    block_hashes: list[Any]
    parent_block_hash: Any
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class VllmBlockRemoved(msgspec.Struct, tag="BlockRemoved", forbid_unknown_fields=False):
    block_hashes: list[Any]
    medium: str | None = None


class VllmAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", forbid_unknown_fields=False):
    pass


VllmEvent = VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared


class VllmEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[VllmEvent]
    data_parallel_rank: int | None = None


def _key(block_hash: Any) -> Any:
    """vLLM hashes are ints or bytes; lists (from msgpack arrays) become hashable tuples."""
    return tuple(block_hash) if isinstance(block_hash, list) else block_hash


class EventTranslator:
    """Keeps vLLM's block hash → kvflow sequence hash map and numbers the events it emits."""

    def __init__(self, worker_id: int, block_size: int) -> None:
        self.worker_id = worker_id
        self.block_size = block_size
        self.hashes: dict[Any, int] = {}
        # kvflow hash -> its parent's, in insertion (parent-before-child) order: the snapshot.
        self.parents: dict[int, int | None] = {}
        self.next_id = 1
        self._decode = msgspec.msgpack.Decoder(VllmEventBatch).decode

    def translate_payload(self, payload: bytes) -> list[KvEvent]:
        return [e for ev in self._decode(payload).events if (e := self.translate(ev)) is not None]

    def translate(self, event: VllmEvent) -> KvEvent | None:
        if isinstance(event, VllmBlockStored):
            data: Any = self._stored(event)
        elif isinstance(event, VllmBlockRemoved):
            data = self._removed(event)
        else:
            self.hashes.clear()
            self.parents.clear()
            data = AllCleared()
        if data is None:
            return None
        self.next_id += 1
        return KvEvent(self.worker_id, self.next_id - 1, data)

    def _stored(self, event: VllmBlockStored) -> BlocksStored | None:
        if event.block_size != self.block_size:
            raise ValueError(f"vLLM stored blocks of {event.block_size} tokens, expected {self.block_size}")
        if event.medium not in (None, "GPU"):
            return None  # offload tiers are not the device cache the router scores
        parent_key = _key(event.parent_block_hash) if event.parent_block_hash is not None else None
        parent = self.hashes.get(parent_key) if parent_key is not None else None
        if parent_key is not None and parent is None:
            log.debug("vLLM block stored under an unknown parent; dropped")
            return None
        blocks, prev, bs = [], parent, self.block_size
        for i, vllm_hash in enumerate(event.block_hashes):
            tokens = event.token_ids[i * bs : (i + 1) * bs]
            parent_of, prev = prev, chain_hash(prev, local_block_hash(tokens))
            self.hashes[_key(vllm_hash)] = prev
            self.parents.setdefault(prev, parent_of)
            blocks.append(StoredBlock(prev, tokens))
        return BlocksStored(blocks, parent)

    def _removed(self, event: VllmBlockRemoved) -> BlocksRemoved | None:
        if event.medium not in (None, "GPU"):
            return None
        ours = [h for v in event.block_hashes if (h := self.hashes.pop(_key(v), None)) is not None]
        for h in ours:
            self.parents.pop(h, None)
        return BlocksRemoved(ours) if ours else None

    def snapshot(self) -> CacheSnapshot:
        """The cache as the events so far describe it, for a router that missed some."""
        blocks = [CachedBlock(h, parent) for h, parent in self.parents.items()]
        return CacheSnapshot(self.worker_id, self.next_id - 1, blocks)


class ZmqEventRelay:
    """Subscribes to vLLM's ZMQ KV-event publisher and hands translated events to `publish`."""

    def __init__(
        self, endpoint: str, translator: EventTranslator, publish: Callable[[list[KvEvent]], None]
    ) -> None:
        import zmq
        import zmq.asyncio

        self.endpoint = endpoint
        self.translator = translator
        self.publish = publish
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)
        self._task: asyncio.Task | None = None
        self.received = 0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            parts = await self._sock.recv_multipart()
            self.received += 1
            events = self.translator.translate_payload(parts[-1])
            if events:
                self.publish(events)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close(linger=0)
        self._ctx.term()
