"""Property-based fuzzing from the frontend's own /openapi.json: never a 5xx, never a crash.

Why hypothesis and not schemathesis: hypothesis is already a test dependency and this
machine cannot install packages; the OpenAPI document here uses a small JSON-schema
subset ($ref, anyOf, enum, type, properties/required, items, min/max), so the strategy
below is built straight from it. Requests come in two kinds: schema-shaped bodies (with
the served model's name, so they reach tokenizing and the engine), and the same bodies
mutated (a field replaced by arbitrary JSON, a required field dropped, junk bytes).
Each must get a 2xx, or a 4xx with an OpenAI error body. A well-formed stream runs the
whole time on another connection and must keep working.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflow.frontend.openapi import build_openapi
from kvflow.frontend.testing import EchoEngineClient, start_served
from kvflow.llm.model_card import ModelCard

MODEL = "test-model"
SPEC = build_openapi()
SCHEMAS: dict[str, Any] = SPEC["components"]["schemas"]
ROUTES = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
          "/v1/messages": "MessagesRequest", "/v1/messages/count_tokens": "CountTokensRequest",
          "/v1/responses": "ResponsesRequest", "/tokenize": "TokenizeRequest",
          "/detokenize": "DetokenizeRequest", "/v1/embeddings": "EmbeddingRequest"}
ANTHROPIC = ("/v1/messages", "/v1/messages/count_tokens")
# What a 200 JSON body of each route must have, and how each route's stream ends.
RESULT_KEY = {"/v1/chat/completions": "choices", "/v1/completions": "choices",
              "/v1/messages": "content", "/v1/messages/count_tokens": "input_tokens",
              "/v1/responses": "output", "/tokenize": "tokens", "/detokenize": "prompt",
              "/v1/embeddings": "data"}
STREAM_END = {"/v1/messages": (b"event: message_stop\n", b"event: error\n"),
              "/v1/responses": (b"event: response.completed\n", b"event: response.incomplete\n",
                                b"event: error\n")}
# The original two routes keep their budget; the newer ones get fewer examples each.
EXAMPLES = {"/v1/chat/completions": 150, "/v1/completions": 150}

# Arbitrary JSON, including the values that break naive servers.
EDGE_NUMBERS = st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**30,
                                1e308, -1e308, 5e-324, 0.5])
JSON_LEAVES = st.none() | st.booleans() | EDGE_NUMBERS | st.integers() \
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
ANY_JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """A strategy for JSON values matching `schema` (the subset msgspec emits)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(SCHEMAS[name], depth + 1))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, depth) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return _object(schema, depth)
    if kind == "array":
        items = from_schema(schema.get("items", {}), depth + 1)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=3)
    return _scalar(kind, schema)


def _scalar(kind: str | None, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum")
    if kind == "integer":
        return st.integers(min_value=low, max_value=high) | EDGE_NUMBERS.filter(
            lambda v: isinstance(v, int) and (low is None or v >= low)
            and (high is None or v <= high))
    if kind == "number":
        excl = "exclusiveMinimum" in schema
        return st.floats(min_value=low, max_value=high, exclude_min=excl, allow_nan=False,
                         allow_infinity=False)
    if kind == "string":
        return st.text(max_size=40)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return ANY_JSON  # no type: anything


def _object(schema: dict[str, Any], depth: int) -> st.SearchStrategy[Any]:
    props = schema.get("properties")
    if props is None:
        return st.dictionaries(st.text(max_size=8), ANY_JSON, max_size=4)
    required = set(schema.get("required", ()))
    strategies = {name: _property(name, sub, depth) for name, sub in props.items()}
    return st.fixed_dictionaries(
        {k: v for k, v in strategies.items() if k in required},
        optional={k: v for k, v in strategies.items() if k not in required},
    )


def _property(name: str, schema: dict[str, Any], depth: int) -> st.SearchStrategy[Any]:
    if name == "model" and depth == 0:
        return st.just(MODEL) | st.text(max_size=12)  # mostly the served model
    if name in ("max_tokens", "max_completion_tokens", "max_output_tokens") and depth == 0:
        return st.integers(min_value=1, max_value=16) | from_schema(schema, depth)
    return from_schema(schema, depth)


@st.composite
def mutated(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    """A schema-shaped body damaged in one of several ways, as bytes."""
    how = draw(st.sampled_from(["replace", "drop", "extra", "bytes", "wrap"]))
    body = dict(body)
    if how == "replace" and body:
        body[draw(st.sampled_from(sorted(body)))] = draw(ANY_JSON)
    elif how == "drop" and body:
        body.pop(draw(st.sampled_from(sorted(body))))
    elif how == "extra":
        body[draw(st.text(max_size=10))] = draw(ANY_JSON)
    elif how == "wrap":
        return json.dumps([body]).encode()
    raw = json.dumps(body).encode()
    if how == "bytes":
        cut = draw(st.integers(min_value=0, max_value=len(raw)))
        return raw[:cut] + draw(st.binary(max_size=8)) + raw[cut:]
    return raw


def request_bodies(route: str) -> st.SearchStrategy[bytes]:
    shaped = from_schema(SCHEMAS[ROUTES[route]])
    return shaped.map(lambda b: json.dumps(b).encode()) | shaped.flatmap(mutated)


# ---------------------------------------------------------------- a frontend in a thread


@dataclass
class ThreadedFrontend:
    """An HttpFrontend with the echo engine, on an event loop of its own thread."""

    host: str = ""
    port: int = 0
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def start(self, card: ModelCard) -> None:
        ready = threading.Event()
        threading.Thread(target=self._run, args=(card, ready), daemon=True).start()
        assert ready.wait(10), "frontend did not start"

    def _run(self, card: ModelCard, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def serve() -> None:
            self.served = await start_served()
            self.served.add(card, EchoEngineClient(keep_history=False))
            self.host, self.port = self.served.host, self.served.port
            ready.set()

        self.loop.run_until_complete(serve())
        self.loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.served.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("POST", path, body, {"content-type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


class SteadyStream:
    """Well-formed streaming requests, back to back on their own thread, until stopped."""

    def __init__(self, frontend: ThreadedFrontend) -> None:
        self.frontend = frontend
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        body = json.dumps({"model": MODEL, "prompt": "steady as she goes", "stream": True,
                           "max_tokens": 4}).encode()
        while not self._stop.is_set():
            status, data = self.frontend.post("/v1/completions", body)
            if status != 200 or not data.endswith(b"data: [DONE]\n\n"):
                self.failures.append(f"{status}: {data[:200]!r}")
            self.done += 1


@pytest.fixture(scope="module")
def frontend(card: ModelCard) -> Iterator[ThreadedFrontend]:
    server = ThreadedFrontend()
    server.start(card)
    yield server
    server.stop()


def check_response(route: str, status: int, data: bytes) -> None:
    assert status < 500, f"{status}: {data[:500]!r}"
    if status >= 400:
        body = json.loads(data)
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"]
        if route in ANTHROPIC:
            assert body["type"] == "error" and set(error) == {"type", "message"}
        else:
            assert set(error) == {"message", "type", "param", "code"}
    elif data.startswith(b"data: "):
        assert data.endswith(b"data: [DONE]\n\n")
    elif data.startswith(b"event: "):
        last = data[data.rstrip(b"\n").rfind(b"event: "):]
        assert last.startswith(STREAM_END[route]), data[-300:]
    else:
        assert RESULT_KEY[route] in json.loads(data)


def fuzz_settings(route: str) -> settings:
    return settings(FUZZ, max_examples=EXAMPLES.get(route, 60))


FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzzed_requests_never_get_a_5xx(frontend: ThreadedFrontend, route: str) -> None:
    with SteadyStream(frontend) as steady:

        @fuzz_settings(route)
        @given(body=request_bodies(route))
        def one(body: bytes) -> None:
            check_response(route, *frontend.post(route, body))

        one()
    assert steady.done > 0 and not steady.failures, steady.failures[:3]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/messages", "/v1/responses",
                                   "/tokenize"])
def test_the_strategy_reaches_the_engine(frontend: ThreadedFrontend, route: str) -> None:
    """The fuzzer is only useful if schema-shaped bodies also get 200s, not only 400s."""
    statuses: list[int] = []

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=from_schema(SCHEMAS[ROUTES[route]]))
    def one(body: dict[str, Any]) -> None:
        status, data = frontend.post(route, json.dumps(body).encode())
        check_response(route, status, data)
        statuses.append(status)

    one()
    assert 200 in statuses and any(400 <= s < 500 for s in statuses)
