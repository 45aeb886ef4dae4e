"""Migration in process: real mocker engines as workers, one of which is lost mid-stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection

import msgspec
import pytest

from kvflow.engines.mocker import MockerConfig, MockerEngine
from kvflow.frontend.engine_client import EngineUnavailable
from kvflow.frontend.migration import (
    MigratingClient,
    MigrationFailed,
    Progress,
    WorkerLost,
    unrebuildable_reason,
)
from kvflow.frontend.testing import raw_request
from kvflow.llm.protocol import (
    EngineOutput,
    PreprocessedRequest,
    RoutingHints,
    SamplingOptions,
    StopConditions,
)
from kvflow.runtime.context import Context

PROMPT = list(range(10, 42))


class FlakyWorkers:
    """Mocker engines by worker id; the first one not excluded serves a request.

    `lose_after[w] = k`: worker w is lost once it has streamed k tokens of a request
    (the outputs carrying them are cut there), like a process killed mid-stream.
    """

    def __init__(self, engines: dict[int, MockerEngine], lose_after: dict[int, int]) -> None:
        self.engines = engines
        self.lose_after = lose_after
        self.requests: list[tuple[int, PreprocessedRequest]] = []

    def live_workers(self) -> int:
        return len(self.engines)

    async def generate(
        self, request: PreprocessedRequest, context: Context, exclude: Collection[int] = ()
    ) -> AsyncIterator[EngineOutput]:
        worker = next((w for w in self.engines if w not in exclude), None)
        if worker is None:
            raise EngineUnavailable("every worker was lost")
        self.requests.append((worker, request))
        limit = self.lose_after.get(worker)
        sent = 0
        stream = self.engines[worker].generate(request, context)
        try:
            async for out in stream:
                if limit is not None and sent + len(out.token_ids) >= limit:
                    out.token_ids = out.token_ids[: limit - sent]
                    out.finish_reason = None
                    yield out
                    raise WorkerLost(f"worker {worker} was lost", worker)
                sent += len(out.token_ids)
                yield out
        finally:
            await stream.aclose()


@pytest.fixture
async def engines() -> AsyncIterator[dict[int, MockerEngine]]:
    made = {w: MockerEngine(MockerConfig(speedup_ratio=0, vocab_size=500, block_size=4))
            for w in (1, 2, 3)}
    for engine in made.values():
        await engine.start()
    yield made
    for engine in made.values():
        await engine.stop()


def _request(max_tokens: int = 40, **sampling: object) -> PreprocessedRequest:
    return PreprocessedRequest("req-1", PROMPT, sampling=SamplingOptions(**sampling),
                               stop=StopConditions(max_tokens=max_tokens, min_tokens=5))


async def _run(client, request: PreprocessedRequest) -> tuple[list[int], list[EngineOutput]]:
    outs = [out async for out in client.generate(request, Context(request.request_id))]
    return [t for out in outs for t in out.token_ids], outs


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {}], ids=["greedy", "unseeded"])
async def test_lost_worker_stream_continues_without_gap_or_repeat(engines, sampling) -> None:
    request = _request(**sampling)
    unbroken, _ = await _run(FlakyWorkers(engines, {}), request)
    flaky = FlakyWorkers(engines, {1: 7, 2: 12})  # lost at token 7, then 12 tokens later
    counted: list[int] = []
    tokens, outs = await _run(MigratingClient(flaky, 3, lambda: counted.append(1)), request)
    assert tokens == unbroken and len(tokens) == 40
    assert outs[-1].finish_reason == "length" and len(counted) == 2
    (w1, first), (w2, second), (w3, third) = flaky.requests
    assert (w1, w2, w3) == (1, 2, 3)  # each lost worker stays excluded
    assert second.token_ids == PROMPT + unbroken[:7]
    assert second.stop.max_tokens == 33 and second.prior_output_tokens == 7
    assert third.token_ids == PROMPT + unbroken[:19]
    assert (third.stop.max_tokens, third.stop.min_tokens) == (21, 0)
    assert [i for i, o in enumerate(outs) if o.cached_tokens is not None] == [0]


async def test_each_choice_of_n_migrates_on_its_own(engines) -> None:
    flaky = FlakyWorkers(engines, {1: 5})
    client = MigratingClient(flaky, 3)
    for index in range(3):
        request = msgspec.structs.replace(_request(12), request_id=f"req-{index}")
        tokens, _ = await _run(client, request)
        assert len(tokens) == 12
    assert [w for w, _ in flaky.requests] == [1, 2, 1, 2, 1, 2]


async def test_lost_before_the_first_token_is_resent_unchanged(engines) -> None:
    flaky = FlakyWorkers(engines, {1: 0})
    request = _request(8, seed=5, temperature=0.7)  # seeded, yet nothing to rebuild yet
    tokens, _ = await _run(MigratingClient(flaky, 3), request)
    assert len(tokens) == 8 and flaky.requests[1][1] == request


async def test_lost_right_after_the_last_token_finishes_the_stream(engines) -> None:
    flaky = FlakyWorkers(engines, {1: 6})  # seeded: no rebuild needed, nothing is left
    tokens, outs = await _run(MigratingClient(flaky, 0), _request(6, seed=3, temperature=1.0))
    assert len(tokens) == 6 and outs[-1].finish_reason == "length"
    assert len(flaky.requests) == 1  # nothing left to generate: no new worker needed


async def test_lost_after_the_finish_is_not_migrated() -> None:
    class LostAfterFinish:
        calls = 0

        def live_workers(self) -> int:
            return 1

        async def generate(self, request, context, exclude=()):
            self.calls += 1
            yield EngineOutput(token_ids=[1, 2], finish_reason="stop")
            raise WorkerLost("worker 4 was lost before its END frame", 4)

    inner = LostAfterFinish()
    tokens, outs = await _run(MigratingClient(inner, 3), _request(10, seed=1))
    assert tokens == [1, 2] and outs[-1].finish_reason == "stop" and inner.calls == 1


async def test_migration_limit(engines) -> None:
    flaky = FlakyWorkers(engines, {1: 3, 2: 6, 3: 9})
    with pytest.raises(MigrationFailed, match=r"moved 2 times \(migration limit 2\)"):
        await _run(MigratingClient(flaky, 2), _request())


@pytest.mark.parametrize(
    ("request_kw", "why"),
    [
        ({"sampling": SamplingOptions(seed=7, temperature=0.8)}, "sampling seed"),
        ({"sampling": SamplingOptions(response_format={"type": "json_object"})},
         "guided decoding"),
        ({"sampling": SamplingOptions(frequency_penalty=0.5)}, "penalties"),
        ({"routing": RoutingHints(worker_id=1)}, "pinned"),
    ],
)
async def test_unrebuildable_requests_fail_clearly(engines, request_kw, why) -> None:
    request = msgspec.structs.replace(_request(), **request_kw)
    assert why in (unrebuildable_reason(request) or "")
    flaky = FlakyWorkers(engines, {1: 4})
    with pytest.raises(MigrationFailed, match=f"after 4 tokens.*{why}.*retry the request"):
        await _run(MigratingClient(flaky, 3), request)


def test_rebuildable_requests() -> None:
    for sampling in (SamplingOptions(seed=3, temperature=0), SamplingOptions(logprobs=2, n=2),
                     SamplingOptions(response_format={"type": "text"}, presence_penalty=0.0)):
        request = msgspec.structs.replace(_request(), sampling=sampling)
        assert unrebuildable_reason(request) is None


def test_progress_builds_the_continuation() -> None:
    progress = Progress(_request(10))
    assert progress.continuation() is progress.original  # nothing streamed: sent as is
    progress.take(EngineOutput(token_ids=[1, 2, 3], cached_tokens=16))
    nxt = progress.continuation()
    assert nxt.token_ids == [*PROMPT, 1, 2, 3] and nxt.request_id == "req-1"
    assert (nxt.stop.max_tokens, nxt.stop.min_tokens, nxt.prior_output_tokens) == (7, 2, 3)
    out = progress.take(EngineOutput(token_ids=[4], cached_tokens=35))
    assert out.cached_tokens is None  # the prompt's cache hit was reported the first time


async def test_stopped_request_is_not_migrated(engines) -> None:
    flaky = FlakyWorkers(engines, {1: 3})
    context = Context("req-1")
    client = MigratingClient(flaky, 3)
    outs = []
    async for out in client.generate(_request(), context):
        outs.append(out)
        context.stop_generating()  # the HTTP client went away
    assert len(flaky.requests) == 1


async def test_migration_failure_mid_stream_is_an_sse_error_event(served, card) -> None:
    class Lost:
        def live_workers(self) -> int:
            return 1

        async def generate(self, request, context, exclude=()):
            yield EngineOutput(token_ids=request.token_ids[:2])
            raise WorkerLost("worker 9 was lost", 9)

    served.add(card, MigratingClient(Lost(), 0))
    body = json.dumps({"model": "test-model", "prompt": "hello world", "stream": True,
                       "max_tokens": 20}).encode()
    resp = await raw_request(served.host, served.port, "POST", "/v1/completions", body,
                             {"content-type": "application/json"})
    assert resp.status == 200  # the stream had started
    events = [e for e in resp.body.decode().split("\n\n") if e]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "worker_lost" and "migration limit 0" in error["message"]
    assert events[-1] == "data: [DONE]"
