"""register_llm: a worker announces the model it serves, under its lease.

A model entry lives at `v1/models/<namespace>/<model name>/<instance hex>` and
names the endpoint that serves it plus the model card. Card files too large to
travel inline are served by the worker on `<namespace>.<component>.model_files`
(request: sha256, responses: byte chunks) or read from a shared path; the
frontend verifies every file against its sha256.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from kvflow.llm.model_card import (
    DEFAULT_INLINE_LIMIT,
    ModelCard,
    build_model_card,
    read_card_file,
)
from kvflow.runtime import Context, DistributedRuntime, Endpoint
from kvflow.runtime.errors import UserError

MODELS_PREFIX = "v1/models/"
ROLE_AGGREGATED = "aggregated"
ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
ROLES = (ROLE_AGGREGATED, ROLE_PREFILL, ROLE_DECODE)
FILE_CHUNK = 1 << 20


class ModelInput(enum.Enum):
    Tokens = "tokens"
    Text = "text"


class ModelType(enum.Flag):
    Chat = enum.auto()
    Completions = enum.auto()
    Embedding = enum.auto()


class ModelEntry(msgspec.Struct):
    """What discovery holds for one worker instance serving one model."""

    name: str
    endpoint: str  # "ns.component.endpoint"
    instance_id: int
    card: ModelCard
    files_endpoint: str = ""
    # Disaggregated serving: "prefill" / "decode" pools of one model, or "aggregated".
    role: str = ROLE_AGGREGATED


def model_key(namespace: str, name: str, instance_id: int) -> str:
    return f"{MODELS_PREFIX}{namespace}/{name}/{instance_id:016x}"


def _type_names(model_type: ModelType) -> list[str]:
    names = {ModelType.Chat: "chat", ModelType.Completions: "completions", ModelType.Embedding: "embedding"}
    return [name for flag, name in names.items() if flag in model_type]


async def register_llm(
    model_input: ModelInput,
    model_type: ModelType,
    endpoint: Endpoint,
    model_path: str,
    model_name: str | None = None,
    context_length: int | None = None,
    kv_cache_block_size: int | None = None,
    migration_limit: int | None = None,
    custom_template_path: str | None = None,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
    *,
    instance_id: int | None = None,
    inline_limit: int = DEFAULT_INLINE_LIMIT,
    role: str = ROLE_AGGREGATED,
    guided_decoding: bool = False,
) -> ModelEntry:
    """Publish the model card for `endpoint` (call before or while serving it).

    Card files up to `inline_limit` bytes travel inside the discovery value; larger
    ones are served by this worker on `<component>.model_files`.
    """
    card = await asyncio.to_thread(
        build_model_card,
        model_path,
        inline_limit=inline_limit,
        model_name=model_name,
        context_length=context_length,
        kv_cache_block_size=kv_cache_block_size,
        migration_limit=migration_limit,
        custom_template_path=custom_template_path,
        tool_call_parser=tool_call_parser,
        reasoning_parser=reasoning_parser,
        model_input=model_input.value,
        model_types=_type_names(model_type),
    )
    if guided_decoding:  # the engine can honour response_format
        card = msgspec.structs.replace(card, guided_decoding=True)
    runtime = endpoint.runtime
    iid = instance_id or runtime.lease_id
    await check_compatible(runtime, endpoint.namespace, card, iid)
    files_ep = ""
    if any(ref.inline is None for ref in card.files.values()):
        files_ep = await _serve_files(runtime, endpoint, card, iid)
    entry = ModelEntry(card.name, endpoint.path, iid, card, files_ep, role)
    key = model_key(endpoint.namespace, card.name, iid)
    await runtime.discovery.put(key, msgspec.msgpack.encode(entry), lease=True)
    return entry


class ModelConflictError(UserError):
    """Another worker already serves this model name with a card this one cannot join."""


def block_size_conflict(name: str, theirs: int, other_id: int, ours: int) -> str:
    """The one message for workers of one model with different KV block sizes."""
    return (f"model {name!r} is already served with KV block size {theirs} (worker {other_id:x}); "
            f"this worker's block size is {ours}. Workers of one model must share --block-size "
            f"(KV routing compares blocks); use {theirs} or another --model-name")


async def check_compatible(runtime: DistributedRuntime, namespace: str, card: ModelCard, iid: int) -> None:
    """Refuse to join a model whose registered workers use another KV block size."""
    prefix = f"{MODELS_PREFIX}{namespace}/{card.name}/"
    decode = msgspec.msgpack.Decoder(ModelEntry).decode
    for raw in (await runtime.discovery.get_prefix(prefix)).values():
        other = decode(raw)
        if other.instance_id != iid and other.card.kv_block_size != card.kv_block_size:
            raise ModelConflictError(block_size_conflict(
                card.name, other.card.kv_block_size, other.instance_id, card.kv_block_size))


async def _serve_files(
    runtime: DistributedRuntime, endpoint: Endpoint, card: ModelCard, instance_id: int
) -> str:
    files_ep = endpoint.component.endpoint("model_files")

    async def handler(request: dict, context: Context) -> AsyncIterator[bytes]:
        data = await asyncio.to_thread(read_card_file, card, str(request["sha256"]))
        for i in range(0, len(data), FILE_CHUNK):
            yield data[i : i + FILE_CHUNK]

    asyncio.ensure_future(files_ep.serve(handler, instance_id=instance_id))
    return files_ep.path


def _read_if_matches(path: Path, sha256: str) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


async def fetch_card_file(runtime: DistributedRuntime, entry: ModelEntry, sha256: str) -> bytes:
    """Get one card file: from a readable shared path, else from the worker."""
    for ref in entry.card.files.values():
        if ref.sha256 == sha256 and ref.path:
            data = await asyncio.to_thread(_read_if_matches, Path(ref.path), sha256)
            if data is not None:
                return data
    if not entry.files_endpoint:
        raise FileNotFoundError(f"model {entry.name}: file {sha256[:12]} is neither inline nor served")
    client = await runtime.endpoint(entry.files_endpoint).client()
    try:
        await client.wait_for_instances(timeout=10)
        chunks: list[Any] = [c async for c in client.direct({"sha256": sha256}, entry.instance_id)]
    finally:
        await client.close()
    return b"".join(chunks)
