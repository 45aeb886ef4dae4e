"""Fixtures for the KV tier tests: a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvflow.testing.servers import MOTO_BINARY, S3Server, binary_available


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    if not binary_available(MOTO_BINARY):
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This process's AWS settings point at the test server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.url
    return s3_server
