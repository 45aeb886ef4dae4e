"""Every route has a declared access policy, and the server enforces it over HTTP."""

from __future__ import annotations

import json

import pytest

from kvflow.cli.frontend import build_parser, frontend_config
from kvflow.frontend import FrontendConfig
from kvflow.frontend.routes import ROUTES, Route, policy
from kvflow.frontend.testing import EchoEngineClient, raw_request, start_served

MODEL = "test-model"
# The policy of every route. A new route must be added here, with a deliberate class.
EXPECTED = {
    "/v1/chat/completions": "inference",
    "/v1/completions": "inference",
    "/v1/models": "inference",
    "/health": "health",
    "/live": "health",
    "/metrics": "metrics",
    "/openapi.json": "openapi",
    "/debug/route": "debug",
    "/v1/messages": "inference",
    "/v1/messages/count_tokens": "inference",
    "/v1/responses": "inference",
    "/v1/embeddings": "inference",
    "/tokenize": "inference",
    "/detokenize": "inference",
    "/fleet": "fleet",
    "/fleet/events": "fleet",
    "/fleet/snapshot": "fleet",
}
ENDLESS = {"/fleet/events"}
BODY = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()


def test_every_route_declares_its_access() -> None:
    assert {path: route.access for path, route in ROUTES.items()} == EXPECTED
    with pytest.raises(TypeError):
        Route("/new", {})  # type: ignore[call-arg]  # no access: refused
    with pytest.raises(ValueError, match="access must be one of"):
        Route("/new", {}, "public")


async def _status(served, path: str, key: str | None) -> tuple[int, str | None]:
    route = ROUTES[path]
    method = sorted(route.methods)[0]
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    resp = await raw_request(served.host, served.port, method, path,
                             BODY if method == "POST" else b"", headers)
    code = resp.json()["error"].get("code") if resp.status >= 400 else None  # Anthropic errors have none
    return resp.status, code


async def _check(config: FrontendConfig, card, expect: dict[str, dict[str | None, int]]) -> None:
    """For every route and key (None = no key): the status, or 'refused' (401/404 not_found)."""
    served = await start_served(config)
    try:
        served.add(card, EchoEngineClient())
        for path in ROUTES:
            for key, want in expect[policy(ROUTES[path], config)].items():
                if path in ENDLESS and want not in (401, 404):
                    continue  # an accepted SSE feed never ends; /fleet/snapshot has its class
                status, code = await _status(served, path, key)
                if want == 401:
                    assert (status, code) == (401, "invalid_api_key"), (path, key)
                elif want == 404:
                    assert (status, code) == (404, "not_found"), (path, key)
                else:
                    assert status not in (401,) and code != "not_found", (path, key, status)
    finally:
        await served.close()


async def test_default_policy_with_keys(card) -> None:
    config = FrontendConfig(port=0, api_keys=("user",), admin_api_keys=("admin",))
    assert {policy(r, config) for r in ROUTES.values()} == {"keyed", "admin", "open"}
    await _check(config, card, {
        "keyed": {None: 401, "wrong": 401, "user": 200, "admin": 200},
        "admin": {None: 401, "user": 401, "admin": 200},  # /debug/route: admin key only
        "open": {None: 200, "wrong": 200},
    })


async def test_debug_takes_the_api_key_when_no_admin_key_is_set(card) -> None:
    config = FrontendConfig(port=0, api_keys=("user",))
    await _check(config, card, {
        "keyed": {None: 401, "user": 200},
        "admin": {None: 401, "wrong": 401, "user": 200},
        "open": {None: 200},
    })


async def test_routes_keyed_or_switched_off(card) -> None:
    config = FrontendConfig(port=0, api_keys=("user",), debug_routes=False,
                            metrics_access="keyed", health_access="off", openapi_access="keyed")
    policies = {p: policy(r, config) for p, r in ROUTES.items()}
    assert policies["/debug/route"] == policies["/health"] == policies["/live"] == "off"
    assert policies["/metrics"] == policies["/openapi.json"] == "keyed"
    await _check(config, card, {
        "keyed": {None: 401, "user": 200},
        "off": {None: 404, "user": 404},
    })


def test_access_flags() -> None:
    ns = build_parser().parse_args([
        "--api-key", "u", "--admin-api-key", "a", "--no-debug-routes", "--metrics-access",
        "keyed", "--health-access", "open", "--openapi-access", "off"])
    config = frontend_config(ns)
    assert (config.api_keys, config.admin_api_keys, config.debug_routes) == (("u",), ("a",), False)
    assert (config.metrics_access, config.health_access, config.openapi_access) == (
        "keyed", "open", "off")
    with pytest.raises(ValueError, match="metrics_access"):
        FrontendConfig(metrics_access="public")
