"""Security defaults: API keys compared in constant time, loopback bind, no pickle or eval."""

from __future__ import annotations

import ast
import hmac
import json
from pathlib import Path

import pytest

import kvflow
from kvflow.cli.frontend import build_parser, frontend_config
from kvflow.frontend import FrontendConfig, HttpFrontend, ModelManager
from kvflow.frontend import routes as frontend_routes
from kvflow.frontend.testing import EchoEngineClient, raw_request, start_served

MODEL = "test-model"
BODY = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()


@pytest.fixture
async def keyed(card):
    served = await start_served(FrontendConfig(port=0, api_keys=("k-one", "k-two")))
    served.add(card, EchoEngineClient())
    yield served
    await served.close()


async def _post(served, authorization: str | None, path: str = "/v1/completions"):
    headers = {"content-type": "application/json"}
    if authorization is not None:
        headers["authorization"] = authorization
    method, body = ("GET", b"") if path == "/v1/models" else ("POST", BODY)
    return await raw_request(served.host, served.port, method, path, body, headers)


@pytest.mark.parametrize("auth", [None, "", "Bearer", "Bearer ", "Basic k-one", "Bearer k-on",
                                  "Bearer k-one2", "Bearer K-ONE", "k-one", "Bearer k-one k-two"])
async def test_wrong_or_missing_keys_get_401(keyed, auth) -> None:
    for path in ("/v1/completions", "/v1/models"):
        resp = await _post(keyed, auth, path)
        assert resp.status == 401, (auth, path)
        error = resp.json()["error"]
        assert error["type"] == "authentication_error" and "Bearer" in error["message"]
        assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("auth", ["Bearer k-one", "bearer k-two", "Bearer  k-one "])
async def test_any_configured_key_works(keyed, auth) -> None:
    assert (await _post(keyed, auth)).status == 200


async def test_keys_are_compared_in_constant_time(keyed, monkeypatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(frontend_routes.hmac, "compare_digest", recording)
    assert (await _post(keyed, "Bearer nope")).status == 401
    assert compared == [(b"nope", b"k-one"), (b"nope", b"k-two")]  # every key, no == on str


async def test_frontend_binds_loopback_unless_told_otherwise() -> None:
    assert FrontendConfig().host == "127.0.0.1"
    assert frontend_config(build_parser().parse_args([])).host == "127.0.0.1"
    frontend = HttpFrontend(FrontendConfig(port=0), ModelManager())
    host, _ = await frontend.start()
    try:
        assert host == "127.0.0.1"
    finally:
        await frontend.stop()


# Modules and builtins that turn bytes or text into code or arbitrary objects.
_UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
_UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def test_no_pickle_or_eval_anywhere_in_kvflow() -> None:
    """Network input is decoded only by msgspec into declared types; nothing executes it."""
    found = []
    for path in sorted(Path(kvflow.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names = {node.func.id} & _UNSAFE_CALLS
            elif isinstance(node, ast.Attribute) and node.attr in ("load", "unsafe_load"):
                base = node.value
                names = {"yaml.load"} if isinstance(base, ast.Name) and base.id == "yaml" else set()
            else:
                continue
            bad = names & (_UNSAFE_MODULES | _UNSAFE_CALLS | {"yaml.load"})
            found += [f"{path}:{node.lineno}: {name}" for name in bad]
    assert not found, found
