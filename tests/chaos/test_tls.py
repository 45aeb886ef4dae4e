"""TLS end to end: HTTPS on the frontend, and a TLS request plane between frontend and worker."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import subprocess

import openai
import pytest

from kvflow.frontend.testing import read_response

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 / localhost: (cert.pem, key.pem)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True)
    return str(cert), str(key)


async def _https_post(url: str, cafile: str, path: str, body: dict):
    host, port = re.match(r"https://([^:]+):(\d+)", url).groups()  # type: ignore[union-attr]
    ctx = ssl.create_default_context(cafile=cafile)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    try:
        return await read_response(reader)
    finally:
        writer.close()


async def test_https_frontend_and_tls_request_plane(make_stack, cert) -> None:
    cert_file, key_file = cert
    stack = make_stack()
    fe = stack.start("frontend", "--http-port", "0", "--tls-cert", cert_file, "--tls-key", key_file,
                     name="frontend", request_plane_tls_ca=cert_file)
    fe.wait_for_output("frontend: listening on", timeout=60)
    url = re.search(r"listening on (https://\S+)", fe.output()).group(1)  # type: ignore[union-attr]
    stack.start("worker", "--engine", "mocker", "--model-path", str(stack.model_dir),
                "--model-name", "m", "--speedup-ratio", "0", name="worker",
                request_plane_tls_cert=cert_file, request_plane_tls_key=key_file)
    body = {"model": "m", "prompt": "over tls", "max_tokens": 5}
    for _ in range(300):
        resp = await _https_post(url, cert_file, "/v1/completions", body)
        # 404 until the model appears; 503 ("no_workers", retry) while its pool has not
        # seen the worker's instance yet
        if resp.status not in (404, 503):
            break
        await asyncio.sleep(0.05)
    assert resp.status == 200 and resp.json()["usage"]["completion_tokens"] == 5
    # Plain HTTP to the HTTPS port gets nowhere.
    host, port = re.match(r"https://([^:]+):(\d+)", url).groups()  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    assert not (await reader.read(100)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_a_plain_frontend_cannot_use_a_tls_worker(make_stack, cert) -> None:
    cert_file, key_file = cert
    stack = make_stack()
    url = stack.frontend()  # no request-plane CA: it speaks plain TCP
    stack.start("worker", "--engine", "mocker", "--model-path", str(stack.model_dir),
                "--model-name", "m", "--speedup-ratio", "0", name="worker",
                request_plane_tls_cert=cert_file, request_plane_tls_key=key_file)
    async with stack.client() as client:
        for _ in range(600):  # the model is listed once the worker registers (the canary
            if (await client.models.list()).data:  # then finds it does not answer: not live)
                break
            await asyncio.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(model="m", prompt="plain", max_tokens=3)
    assert info.value.status_code == 503
    assert url.startswith("http://")
