"""Wire framing for the request plane: fixed header + msgpack payload.

Frame layout (network byte order), fixed forever so any two versions can at least
read each other's version byte:

    u32 length   bytes after this field (header rest + payload)
    u8  version  PROTOCOL_VERSION
    u8  kind     FrameKind
    u64 stream   stream id, chosen by the client (0 = connection-level)
    ... payload  msgpack (kind-specific)
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgspec

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!IBBQ")
HEADER_SIZE = HEADER.size  # 14
LENGTH_REST = HEADER_SIZE - 4
DEFAULT_MAX_FRAME = 64 * 1024 * 1024


class FrameKind(enum.IntEnum):
    HELLO = 0  # payload: HelloMsg
    REQUEST = 1  # payload: RequestHeader (array) whose last item is the raw request body
    DATA = 2  # payload: one response, msgpack
    END = 3  # stream finished normally
    ERROR = 4  # payload: ErrorMsg
    CANCEL = 5  # client → server: stop this stream


class HelloMsg(msgspec.Struct, array_like=True):
    version: int
    peer: str = ""


class RequestHeader(msgspec.Struct, array_like=True):
    path: str
    instance_id: int
    request_id: str
    body: msgspec.Raw


class ErrorMsg(msgspec.Struct, array_like=True):
    error_type: str
    message: str
    # "remote" (handler raised), "refused" (draining / unknown endpoint), "protocol"
    category: str = "remote"


_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
_any_decoder = msgspec.msgpack.Decoder()
decode_any = _any_decoder.decode
_header_decoder = msgspec.msgpack.Decoder(RequestHeader)
_error_decoder = msgspec.msgpack.Decoder(ErrorMsg)
_hello_decoder = msgspec.msgpack.Decoder(HelloMsg)


def frame(kind: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One complete frame."""
    return HEADER.pack(LENGTH_REST + len(payload), PROTOCOL_VERSION, kind, stream_id) + payload


def decode_request_header(payload: bytes | memoryview) -> RequestHeader:
    return _header_decoder.decode(payload)


def decode_error(payload: bytes | memoryview) -> ErrorMsg:
    return _error_decoder.decode(payload)


def decode_hello(payload: bytes | memoryview) -> HelloMsg:
    return _hello_decoder.decode(payload)


def decoder_for(type_: Any) -> msgspec.msgpack.Decoder:
    """A reusable decoder for a response or request type (None = any msgpack value)."""
    if type_ is None:
        return _any_decoder
    return msgspec.msgpack.Decoder(type_)


class FrameBuffer:
    """The bytes of an incomplete frame between reads.

    `join(data)` puts kept bytes in front of new data, and returns None while the kept frame
    is still incomplete, so a big frame arriving in many reads is copied once, not per read.
    """

    __slots__ = ("_need", "_rest")

    def __init__(self) -> None:
        self._rest = bytearray()
        self._need = 0  # bytes the kept frame (or its header) needs in all

    def join(self, data: bytes) -> bytes | None:
        rest = self._rest
        if not rest:
            return data
        rest += data
        if len(rest) < self._need:
            return None
        whole = bytes(rest)
        rest.clear()
        return whole

    def keep(self, data: bytes, pos: int) -> None:
        """Keep `data[pos:]`, the start of a frame that has not fully arrived."""
        self._rest += memoryview(data)[pos:]
        rest = len(data) - pos
        self._need = HEADER_SIZE if rest < HEADER_SIZE else 4 + HEADER.unpack_from(data, pos)[0]

    def __len__(self) -> int:
        return len(self._rest)


class FrameParser:
    """Incremental parser: feed bytes, get (version, kind, stream_id, payload) frames.

    A bad version byte is NOT rejected here: the caller compares versions so it can
    answer with a clear message before closing.
    """

    __slots__ = ("_buffer", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buffer = FrameBuffer()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        """Returns complete frames as (version, kind, stream_id, payload)."""
        whole = self._buffer.join(data)
        if whole is None:
            return []
        out: list[tuple[int, int, int, bytes]] = []
        pos, n, unpack = 0, len(whole), HEADER.unpack_from
        while n - pos >= HEADER_SIZE:
            length, version, kind, stream_id = unpack(whole, pos)
            if length < LENGTH_REST or length > self.max_frame:
                raise OversizeFrame(length, self.max_frame)
            end = pos + 4 + length
            if end > n:
                break
            out.append((version, kind, stream_id, whole[pos + HEADER_SIZE : end]))
            pos = end
        if pos < n:
            self._buffer.keep(whole, pos)
        return out

    @property
    def pending(self) -> int:
        return len(self._buffer)


class OversizeFrame(Exception):
    def __init__(self, length: int, limit: int):
        super().__init__(f"frame length {length} outside [{LENGTH_REST}, {limit}]")
