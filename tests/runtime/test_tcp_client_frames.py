"""The TCP request plane's receiving side: frames split anywhere, batched, oversize or bad."""

from __future__ import annotations

import random

import msgspec
import pytest

from kvflow.runtime import codec
from kvflow.runtime.codec import FrameKind
from kvflow.runtime.errors import FrameError, ProtocolVersionError, RemoteError
from kvflow.runtime.request_plane.tcp_client import ClientConnection, ConnectionPool, StreamSink


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.aborted = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str) -> None:
        return None


class Sink(StreamSink):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended = False
        self.error: Exception | None = None

    def on_data(self, payload: bytes) -> None:
        self.data.append(bytes(payload))

    def on_end(self) -> None:
        self.ended = True

    def on_error(self, exc: Exception) -> None:
        self.error = exc


def connection(max_frame: int = 1 << 20) -> tuple[ClientConnection, Transport]:
    conn = ClientConnection(ConnectionPool(), ("127.0.0.1", 1), max_frame)
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def open_streams(conn: ClientConnection, n: int) -> list[tuple[int, Sink]]:
    header = codec.RequestHeader("ns.c.e", 1, "r", msgspec.Raw(b"\xc0"))
    out = []
    for _ in range(n):
        sink = Sink()
        out.append((conn.open_stream(sink, header), sink))
    return out


def wire(streams: list[tuple[int, Sink]], payloads: dict[int, list[bytes]]) -> bytes:
    """Interleaved DATA frames of every stream, a HELLO among them, then an END each."""
    frames = [codec.frame(FrameKind.HELLO, 0, codec.encode(codec.HelloMsg(1, "server")))]
    for i in range(max(len(p) for p in payloads.values())):
        for sid, _ in streams:
            if i < len(payloads[sid]):
                frames.append(codec.frame(FrameKind.DATA, sid, payloads[sid][i]))
    frames += [codec.frame(FrameKind.END, sid) for sid, _ in streams]
    return b"".join(frames)


@pytest.mark.parametrize("seed", range(6))
def test_frames_split_at_random_points_arrive_whole_and_in_order(seed: int) -> None:
    rng = random.Random(seed)
    conn, _ = connection()
    streams = open_streams(conn, 3)
    payloads = {sid: [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 30))]
                for sid, _ in streams}
    data = wire(streams, payloads)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 60))))
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        conn.data_received(data[a:b])
    for sid, sink in streams:
        assert sink.data == payloads[sid] and sink.ended and sink.error is None
    assert conn.buffered == sum(len(p) for p in payloads.values())
    assert not conn.closed


def test_one_byte_at_a_time_and_a_big_frame() -> None:
    conn, _ = connection()
    [(sid, sink)] = open_streams(conn, 1)
    big = bytes(range(256)) * 2000  # 512 kB across many reads
    data = codec.frame(FrameKind.DATA, sid, b"ab") + codec.frame(FrameKind.DATA, sid, big)
    for i in range(40):
        conn.data_received(data[i : i + 1])
    for i in range(40, len(data), 4096):
        conn.data_received(data[i : i + 4096])
    assert sink.data == [b"ab", big]


def test_many_buffered_frames_pause_reading_until_consumed() -> None:
    from kvflow.runtime.request_plane.tcp_client import HIGH_WATER_FRAMES, LOW_WATER_FRAMES

    conn, transport = connection()
    [(sid, sink)] = open_streams(conn, 1)
    conn.data_received(codec.frame(FrameKind.DATA, sid, b"x") * (HIGH_WATER_FRAMES + 1))
    assert transport.paused
    conn.consumed(HIGH_WATER_FRAMES + 2 - LOW_WATER_FRAMES)
    assert not transport.paused


def test_error_frame_goes_to_its_stream_only() -> None:
    conn, _ = connection()
    (a, sink_a), (b, sink_b) = open_streams(conn, 2)
    err = codec.encode(codec.ErrorMsg("ValueError", "bad input", "remote"))
    conn.data_received(codec.frame(FrameKind.ERROR, a, err) + codec.frame(FrameKind.DATA, b, b"1"))
    assert isinstance(sink_a.error, RemoteError) and "bad input" in str(sink_a.error)
    assert sink_b.data == [b"1"] and sink_b.error is None and not conn.closed


@pytest.mark.parametrize(
    "data,error",
    [
        (codec.HEADER.pack(1 << 21, codec.PROTOCOL_VERSION, FrameKind.DATA, 1), FrameError),
        (codec.HEADER.pack(3, codec.PROTOCOL_VERSION, FrameKind.DATA, 1), FrameError),
        (codec.HEADER.pack(codec.LENGTH_REST, 9, FrameKind.DATA, 1), ProtocolVersionError),
        (codec.frame(42, 1), FrameError),
    ],
    ids=["oversize", "too-short", "other-version", "unknown-kind"],
)
def test_bad_frames_fail_every_stream(data: bytes, error: type[Exception]) -> None:
    conn, transport = connection()
    streams = open_streams(conn, 2)
    conn.data_received(data)
    assert conn.closed and transport.aborted
    assert all(isinstance(sink.error, error) for _, sink in streams)
