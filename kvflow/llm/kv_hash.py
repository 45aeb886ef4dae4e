"""KV block hashing shared by engines (prefix caching, KV events) and the router.

A block is `block_size` consecutive tokens; only full blocks are hashed. The local
hash is xxh3-64 (seed 1337) over the tokens as little-endian u32. The sequence
hash of block i chains the sequence hash of block i-1 with the local hash of block
i, so one value names a whole prefix. LoRA names, multimodal content hashes and a
cache salt (tenant isolation: requests with different salts never share a block) are
mixed into the first block's chain seed when present.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence

import xxhash

HASH_SEED = 1337
_PAIR = struct.Struct("<QQ")
_LITTLE = array("I").itemsize == 4 and struct.pack("=I", 1) == struct.pack("<I", 1)


def _u32_bytes(tokens: Sequence[int]) -> bytes:
    buf = array("I", tokens)
    if not _LITTLE:
        buf.byteswap()
    return buf.tobytes()


def local_block_hash(tokens: Sequence[int]) -> int:
    """xxh3-64 with seed 1337 over the block's tokens as little-endian u32."""
    return xxhash.xxh3_64_intdigest(_u32_bytes(tokens), seed=HASH_SEED)


def chain_hash(parent: int | None, local: int) -> int:
    """Sequence hash of a block given its parent's sequence hash (None for the first)."""
    if parent is None:
        return local
    return xxhash.xxh3_64_intdigest(_PAIR.pack(parent, local), seed=HASH_SEED)


def extra_seed(
    lora_name: str | None = None, mm_hashes: Sequence[int] = (), salt: str | None = None
) -> int | None:
    """A parent hash for block 0 that separates LoRA adapters, multimodal inputs and salts."""
    if not lora_name and not mm_hashes and not salt:
        return None
    h = xxhash.xxh3_64(seed=HASH_SEED)
    if lora_name:
        h.update(b"lora:" + lora_name.encode())
    for mm in mm_hashes:
        h.update(b"mm:" + mm.to_bytes(8, "little"))
    if salt:
        data = salt.encode()
        h.update(b"salt:" + len(data).to_bytes(4, "little") + data)
    return h.intdigest()


def local_block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Local hashes of every full block of `tokens`."""
    n_full = len(tokens) // block_size
    data = _u32_bytes(tokens[: n_full * block_size])
    step = block_size * 4
    return [
        xxhash.xxh3_64_intdigest(data[i * step : (i + 1) * step], seed=HASH_SEED)
        for i in range(n_full)
    ]


def sequence_hashes(
    tokens: Sequence[int],
    block_size: int,
    *,
    lora_name: str | None = None,
    mm_hashes: Sequence[int] = (),
    salt: str | None = None,
) -> list[int]:
    """Sequence hashes of every full block of `tokens` (one value per prefix)."""
    parent = extra_seed(lora_name, mm_hashes, salt)
    out: list[int] = []
    for local in local_block_hashes(tokens, block_size):
        parent = chain_hash(parent, local)
        out.append(parent)
    return out
