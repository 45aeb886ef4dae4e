"""Overload control in process: slots, the FIFO queue, 429 + Retry-After, and 503 from workers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from kvflow.frontend import FrontendConfig
from kvflow.frontend.admission import AdmissionControl, AdmissionLimits, EngineOverloaded
from kvflow.frontend.errors import ApiError
from kvflow.frontend.testing import EchoEngineClient, raw_request, start_served
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.runtime.context import Context

MODEL = "test-model"


def _control(inflight: int, queued: int, timeout: float = 5.0) -> AdmissionControl:
    return AdmissionControl(AdmissionLimits(inflight, queued, timeout, retry_after_s=1.5))


async def _hold(control: AdmissionControl, release: asyncio.Event, order: list[int], i: int):
    async with control.slot("m"):
        order.append(i)
        await release.wait()


async def test_slots_then_fifo_queue_then_429() -> None:
    control, release, order = _control(2, 2), asyncio.Event(), []
    tasks = [asyncio.ensure_future(_hold(control, release, order, i)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert order == [0, 1] and control.gate("m").stats().queued == 2
    with pytest.raises(ApiError) as info:
        async with control.slot("m"):
            pass
    assert info.value.status == 429 and info.value.retry_after_s == 1.5
    assert b"retry-after: 2\r\n" in info.value.headers()  # whole seconds, rounded up
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]  # the queued ones ran, first come first served
    assert control.gate("m").stats().inflight == 0


async def test_queue_timeout_is_429() -> None:
    control, release = _control(1, 1, timeout=0.05), asyncio.Event()
    holder = asyncio.ensure_future(_hold(control, release, [], 0))
    await asyncio.sleep(0)
    with pytest.raises(ApiError, match=r"waited 0\.05 s in the queue"):
        async with control.slot("m"):
            pass
    release.set()
    await holder
    assert control.gate("m").stats() == control.gate("other").stats()  # all back to zero


async def test_cancelled_waiter_passes_its_slot_on() -> None:
    control, release, order = _control(1, 2), asyncio.Event(), []
    first = asyncio.ensure_future(_hold(control, release, order, 0))
    await asyncio.sleep(0)
    doomed = asyncio.ensure_future(_hold(control, release, order, 1))
    last = asyncio.ensure_future(_hold(control, release, order, 2))
    await asyncio.sleep(0)
    doomed.cancel()
    release.set()
    await asyncio.gather(first, last)
    assert order == [0, 2] and control.gate("m").stats().inflight == 0


async def test_a_failing_request_frees_its_slot() -> None:
    control = _control(1, 0)
    with pytest.raises(RuntimeError):
        async with control.slot("m"):
            raise RuntimeError("handler failed")
    async with control.slot("m"):
        assert control.gate("m").stats().inflight == 1


def test_models_have_separate_gates() -> None:
    control = _control(1, 0)
    assert control.gate("a") is not control.gate("b")
    assert control.gate("a") is control.gate("a")


async def _post(served, body: dict, **headers: str):
    return await raw_request(served.host, served.port, "POST", "/v1/completions",
                             json.dumps(body).encode(),
                             {"content-type": "application/json", **headers})


async def test_http_429_with_retry_after_and_metrics(card) -> None:
    config = FrontendConfig(port=0, max_inflight_per_model=1, max_queued_per_model=1,
                            overload_retry_after_s=3)
    served = await start_served(config)
    served.add(card, EchoEngineClient(delay_s=0.05, repeat=True))
    body = {"model": MODEL, "prompt": "slow", "max_tokens": 4}
    try:
        results = await asyncio.gather(*(_post(served, body) for _ in range(5)))
        codes = sorted(r.status for r in results)
        assert codes == [200, 200, 429, 429, 429]
        for r in results:
            if r.status == 429:
                assert r.headers["retry-after"] == "3"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        metrics = (await raw_request(served.host, served.port, "GET", "/metrics")).body
        assert b'rejected_requests_total{model="test-model",reason="queue_full"} 3.0' in metrics
    finally:
        await served.close()


@dataclass
class OverloadedEngine:
    """An engine client whose router says every worker is busy."""

    def live_workers(self) -> int:
        return 1

    async def generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        raise EngineOverloaded("router queue full", retry_after_s=7)
        yield EngineOutput()  # pragma: no cover - makes this an async generator


async def test_router_overload_is_503_with_retry_after(served, card) -> None:
    served.add(card, OverloadedEngine())
    for stream in (False, True):
        resp = await _post(served, {"model": MODEL, "prompt": "x", "stream": stream})
        assert resp.status == 503 and resp.headers["retry-after"] == "7"
        err = resp.json()["error"]
        assert err["code"] == "overloaded" and "retry after 7 s" in err["message"]


async def test_duplicate_request_id_in_flight_is_409(served, card) -> None:
    served.add(card, EchoEngineClient(delay_s=0.05, repeat=True))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3}
    first = asyncio.ensure_future(_post(served, body, **{"x-request-id": "trace-1"}))
    await asyncio.sleep(0.02)
    second = await _post(served, body, **{"x-request-id": "trace-1"})
    assert second.status == 409 and second.json()["error"]["code"] == "duplicate_request_id"
    assert (await first).status == 200
    again = await _post(served, body, **{"x-request-id": "trace-1"})  # free once it ended
    assert again.status == 200
