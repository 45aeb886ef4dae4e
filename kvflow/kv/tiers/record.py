"""One stored KV block on any tier: a fixed header (identity, hash, checksum) and the KV bytes.

Every tier below the device stores the same record, so a block offloaded by one worker
can be checked and loaded by another:

    magic "KVB1" | u16 version | u16 reserved | u64 identity | u64 sequence hash
    | u64 payload length | u64 xxh3-64 of the payload | payload

`identity` is a fingerprint of the model and the KV layout (`KvIdentity`); a record
is loaded only when magic, version, identity, hash, length and checksum all agree.
Anything else raises `BlockRejected` with a short reason, which the tier manager
counts and answers with a recompute — never with different tokens.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"KVB1"
VERSION = 1
_HEADER = struct.Struct("<4sHHQQQQ")
HEADER_SIZE = _HEADER.size


class BlockRejected(ValueError):
    """A stored block that must not be loaded; `reason` is one metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class KvIdentity:
    """What a block belongs to: the model and the KV layout (block size, heads, dtype...)."""

    model: str
    layout: str

    @property
    def fingerprint(self) -> int:
        return xxhash.xxh3_64_intdigest(f"{self.model}\0{self.layout}".encode())

    @property
    def key_prefix(self) -> str:
        """A short name for this identity, used in object-store keys and directory names."""
        return f"{self.fingerprint:016x}"


def checksum(payload: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def encode_record(identity: int, seq_hash: int, payload: bytes | memoryview) -> bytes:
    """Header + payload as one bytes object, ready for any tier."""
    header = _HEADER.pack(MAGIC, VERSION, 0, identity, seq_hash, len(payload), checksum(payload))
    return header + bytes(payload)


def check_header(header: bytes | memoryview, identity: int, seq_hash: int) -> tuple[int, int]:
    """(payload length, checksum) a record's header promises, if the header is the block's
    (identity, hash); else BlockRejected."""
    if len(header) < HEADER_SIZE:
        raise BlockRejected("truncated", f"{len(header)} bytes, shorter than the header")
    magic, version, _, ident, stored_hash, length, digest = _HEADER.unpack_from(header)
    if magic != MAGIC or version != VERSION:
        raise BlockRejected("format", f"magic {magic!r} version {version}")
    if ident != identity:
        raise BlockRejected("identity", f"block of model/layout {ident:016x}, want {identity:016x}")
    if stored_hash != seq_hash:
        raise BlockRejected("hash", f"block {stored_hash:016x} stored under {seq_hash:016x}")
    return length, digest


def check_payload(payload: bytes | memoryview, length: int, digest: int, seq_hash: int) -> None:
    """BlockRejected unless `payload` has the header's length and checksum."""
    if len(payload) != length:
        raise BlockRejected("truncated", f"{len(payload)} payload bytes, header says {length}")
    if checksum(payload) != digest:
        raise BlockRejected("checksum", f"block {seq_hash:016x} does not match its checksum")


def decode_record(record: bytes | memoryview, identity: int, seq_hash: int) -> memoryview:
    """The payload of `record` if it is the block (identity, hash) intact; else BlockRejected."""
    view = memoryview(record)
    length, digest = check_header(view, identity, seq_hash)
    payload = view[HEADER_SIZE:]
    check_payload(payload, length, digest, seq_hash)
    return payload
