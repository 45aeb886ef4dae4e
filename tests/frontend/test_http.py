"""The HTTP/1.1 layer on raw sockets: keep-alive, pipelining, bodies, disconnects, TLS."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import msgspec
import pytest

from kvflow.frontend import FrontendConfig
from kvflow.frontend.testing import (
    EchoEngineClient,
    ScriptedEngineClient,
    Served,
    read_response,
    start_served,
    tokens_script,
)
from kvflow.llm.protocol import EngineOutput

MODEL = "test-model"
BODY = json.dumps({"model": MODEL, "prompt": "hello there", "max_tokens": 3}).encode()


def post_bytes(body: bytes = BODY, path: str = "/v1/completions", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body


async def wait_for_true(check, timeout: float) -> None:
    """Poll `check()` every 2 ms until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not true within {timeout}s"
        await asyncio.sleep(0.002)


async def connect(served: Served):
    return await asyncio.open_connection(served.host, served.port)


async def test_keep_alive_serves_many_requests_on_one_connection(served: Served, echo):
    reader, writer = await connect(served)
    for _ in range(3):
        writer.write(post_bytes())
        resp = await read_response(reader)
        assert resp.status == 200
        assert resp.json()["choices"][0]["finish_reason"] == "length"
    writer.close()


async def test_pipelined_requests_answer_in_order(served: Served, echo):
    reader, writer = await connect(served)
    stream_body = json.dumps({"model": MODEL, "prompt": "first one", "stream": True}).encode()
    writer.write(post_bytes(stream_body) + post_bytes()
                 + b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
    first = await read_response(reader)
    second = await read_response(reader)
    third = await read_response(reader)
    assert first.headers["content-type"] == "text/event-stream"
    assert first.body.endswith(b"data: [DONE]\n\n")
    assert second.json()["object"] == "text_completion"
    assert third.json()["object"] == "list"
    writer.close()


async def test_chunked_request_body(served: Served, echo):
    reader, writer = await connect(served)
    half = len(BODY) // 2
    chunks = b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (half, BODY[:half], len(BODY) - half,
                                                      BODY[half:])
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                 + chunks)
    resp = await read_response(reader)
    assert resp.status == 200
    assert resp.json()["choices"][0]["text"]
    writer.close()


async def test_expect_100_continue(served: Served, echo):
    reader, writer = await connect(served)
    head = post_bytes(extra="expect: 100-continue\r\n")[: -len(BODY)]
    writer.write(head)
    interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(BODY)
    resp = await read_response(reader)
    assert resp.status == 200
    writer.close()


async def test_http10_stream_is_close_delimited(served: Served, echo):
    reader, writer = await connect(served)
    body = json.dumps({"model": MODEL, "prompt": "hello", "stream": True}).encode()
    writer.write(post_bytes(body).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    resp = await read_response(reader)  # reads to EOF: the server closes
    assert "transfer-encoding" not in resp.headers
    assert resp.headers["connection"] == "close"
    assert resp.body.endswith(b"data: [DONE]\n\n")
    writer.close()


async def test_connection_close_header_is_honoured(served: Served, echo):
    reader, writer = await connect(served)
    writer.write(post_bytes(extra="connection: close\r\n"))
    resp = await read_response(reader)
    assert resp.headers["connection"] == "close"
    assert await reader.read() == b""
    writer.close()


async def test_malformed_http_gets_400(served: Served):
    reader, writer = await connect(served)
    writer.write(b"THIS IS NOT HTTP\r\n\r\n")
    resp = await read_response(reader)
    assert resp.status == 400
    assert "Malformed HTTP" in resp.json()["error"]["message"]
    writer.close()


async def test_client_disconnect_stops_engine_within_100ms(served: Served, card, tokenizer):
    engine = ScriptedEngineClient(tokens_script(tokenizer.encode("ab"), None), hold_open=True)
    served.add(card, engine)
    reader, writer = await connect(served)
    body = json.dumps({"model": MODEL, "prompt": "x", "stream": True}).encode()
    writer.write(post_bytes(body))
    await reader.readuntil(b"data: ")  # streaming has started
    context = engine.contexts[-1]
    assert not context.is_stopped()
    writer.close()
    start = time.monotonic()
    await wait_for_true(context.is_stopped, timeout=1)
    assert time.monotonic() - start < 0.1
    await wait_for_true(lambda: bool(engine.closed), timeout=1)  # the stream was released


async def test_disconnect_during_non_streaming_request(served: Served, card, tokenizer):
    engine = ScriptedEngineClient(tokens_script(tokenizer.encode("ab"), None), hold_open=True)
    served.add(card, engine)
    _, writer = await connect(served)
    writer.write(post_bytes(json.dumps({"model": MODEL, "prompt": "x"}).encode()))
    await wait_for_true(lambda: bool(engine.contexts), timeout=2)
    writer.close()
    await wait_for_true(lambda: engine.contexts[-1].is_stopped(), timeout=0.1)


async def test_slow_reader_gets_backpressure_not_unbounded_buffering(card, tokenizer):
    """A client that stops reading makes the stream wait, then completes when it reads."""
    served = await start_served()
    try:
        word = tokenizer.token_to_id("<tool_call>")  # one token, 11 characters of text
        outputs = 500
        engine = ScriptedEngineClient(lambda request: [
            EngineOutput(token_ids=[word] * 1000) for _ in range(outputs)
        ] + [EngineOutput(finish_reason="stop")])
        served.add(card, engine)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (served.host, served.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
        body = json.dumps({"model": MODEL, "prompt": "x", "stream": True}).encode()
        writer.write(post_bytes(body))
        await wait_for_true(lambda: bool(engine.requests), timeout=2)
        [conn] = list(served.frontend._server.connections)
        # Not reading: the server must pause, not buffer everything.
        await wait_for_true(lambda: conn.write_paused, timeout=10)
        assert conn.transport.get_write_buffer_size() < 1_000_000
        assert len(engine.closed) == 0  # the stream is waiting, not finished
        resp = await read_response(reader)
        assert resp.body.endswith(b"data: [DONE]\n\n")
        assert resp.body.count(b"<tool_call><tool_call>") >= outputs
        writer.close()
    finally:
        await served.close()


async def test_idle_keep_alive_connection_is_closed(card):
    served = await start_served(FrontendConfig(port=0, keepalive_timeout_s=0.1))
    try:
        served.add(card, EchoEngineClient())
        reader, writer = await connect(served)
        writer.write(post_bytes())
        assert (await read_response(reader)).status == 200
        assert await asyncio.wait_for(reader.read(), timeout=2) == b""
        writer.close()
    finally:
        await served.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate: {exc}")
    return cert, key


async def test_tls(tls_files, card):
    cert, key = tls_files
    config = FrontendConfig(port=0, tls_cert=str(cert), tls_key=str(key))
    served = await start_served(config)
    try:
        served.add(card, EchoEngineClient())
        ctx = ssl.create_default_context(cafile=str(cert))
        reader, writer = await asyncio.open_connection(served.host, served.port, ssl=ctx)
        writer.write(post_bytes())
        resp = await read_response(reader)
        assert resp.status == 200
        assert resp.json()["choices"][0]["text"]
        writer.close()
        assert served.frontend.base_url.startswith("https://")
    finally:
        await served.close()


class _BreaksAfterTokens:
    """Yields some tokens in one loop turn, then fails: a mid-stream engine error."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    async def generate(self, request, context):
        for token in self.ids:
            yield EngineOutput([token])
        raise RuntimeError("engine broke mid-stream")

    def live_workers(self) -> int:
        return 1


async def test_tokens_before_a_mid_stream_engine_error_all_arrive(served: Served, card, tokenizer):
    ids = tokenizer.encode(" alpha beta gamma delta")
    served.add(msgspec.structs.replace(card, name="breaks"), _BreaksAfterTokens(ids))
    body = json.dumps({"model": "breaks", "prompt": "x", "stream": True, "max_tokens": 50}).encode()
    reader, writer = await asyncio.open_connection(served.host, served.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%b" % (len(body), body))
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
    writer.close()
    text = "".join(json.loads(line[6:])["choices"][0]["text"]
                   for line in raw.decode().splitlines() if line.startswith("data: {"))
    assert text == tokenizer.decode(ids)
