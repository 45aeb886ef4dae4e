"""ChoiceProcessor and ChoiceStreams on their own: properties over random token chunkings."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflow.frontend.engine_client import EngineUnavailable
from kvflow.frontend.models import ModelManager, ServedModel
from kvflow.frontend.postprocess import ChoiceProcessor, EngineError
from kvflow.frontend.preprocess import ChoiceInput, OutputOptions
from kvflow.frontend.streams import ChoiceStreams
from kvflow.frontend.testing import EchoEngineClient, ScriptedEngineClient, tokens_script
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest, StopConditions
from kvflow.runtime.context import Context

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # the fixture is module-scoped: safe
WORDS = ["the", " cat", " sat", "STOP", " on", " mat", "é", "你好", "\n", "END", "S", "TO"]


@pytest.fixture(scope="module")
def model(card) -> ServedModel:
    return ModelManager().add_model(card, EchoEngineClient())


def run(model: ServedModel, ids: list[int], sizes: list[int], options: OutputOptions):
    """Feed `ids` in chunks of the given sizes; returns (text, finish, processor)."""
    proc = ChoiceProcessor(model, options, 0, [])
    out, i, k = [], 0, 0
    while i < len(ids) and proc.finish_reason is None:
        n = max(1, sizes[k % len(sizes)])
        chunk = ids[i : i + n]
        i, k = i + n, k + 1
        last = i >= len(ids)
        delta = proc.process(EngineOutput(token_ids=chunk, finish_reason="stop" if last else None))
        if delta is not None:
            out.append(delta.text)
    tail = proc.finish()
    if tail is not None:
        out.append(tail.text)
    return "".join(out), proc.finish_reason, proc


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=30),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    stops=st.lists(st.sampled_from(["STOP", "END", "sat on", "你好"]), max_size=2),
)
def test_stop_strings_cut_at_first_match_whatever_the_chunking(model, words, sizes, stops):
    text = "".join(words)
    ids = model.tokenizer.encode(text)
    got, finish, proc = run(model, ids, sizes, OutputOptions(stop=tuple(stops)))
    full = model.tokenizer.decode(ids)
    cuts = [full.find(s) for s in stops if s in full]
    expected = full[: min(cuts)] if cuts else full
    assert got == expected
    assert finish == "stop"
    assert proc.stopped_by_string == bool(cuts)


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURE_OK)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_multibyte_text_survives_any_chunking(model, sizes):
    text = "naïve 你好 🙂 — ok"
    ids = model.tokenizer.encode(text)
    got, _, proc = run(model, ids, sizes, OutputOptions())
    assert got == text
    assert proc.completion_tokens == len(ids)


def test_engine_error_raises(model):
    proc = ChoiceProcessor(model, OutputOptions(), 0, [])
    with pytest.raises(EngineError, match="out of memory"):
        proc.process(EngineOutput(finish_reason="error", error="out of memory"))
    proc = ChoiceProcessor(model, OutputOptions(), 0, [])
    with pytest.raises(EngineError, match="cancelled the request"):
        proc.process(EngineOutput(finish_reason="cancelled"))


def choice(index: int, ids: list[int]) -> ChoiceInput:
    req = PreprocessedRequest(request_id=f"r-{index}", token_ids=ids,
                              stop=StopConditions(max_tokens=len(ids)))
    return ChoiceInput(index, req)


async def test_streams_merge_and_stop_one_choice():
    engine = ScriptedEngineClient(tokens_script([1, 2, 3], None), hold_open=True)
    parent = Context("r")
    streams = ChoiceStreams(engine, [choice(0, [1]), choice(1, [1])], parent)
    seen: dict[int, int] = {0: 0, 1: 0}
    async for out in streams:
        seen[out.index] += len(out.token_ids)
        if seen[0] == 3 and 0 in streams._active:
            streams.stop(0)
        if seen[1] == 3:
            streams.finished(1)
    await streams.aclose()
    assert seen == {0: 3, 1: 3}
    assert engine.contexts[0].is_stopped()
    assert not parent.is_stopped()
    assert sorted(engine.closed) == ["r-0", "r-1"]


async def test_parent_stop_reaches_every_choice():
    engine = ScriptedEngineClient(tokens_script([1], None), hold_open=True)
    parent = Context("r")
    streams = ChoiceStreams(engine, [choice(0, [1]), choice(1, [1])], parent)
    it = streams.__aiter__()
    await it.__anext__()
    parent.stop_generating()
    await asyncio.sleep(0.01)
    assert all(c.is_stopped() for c in engine.contexts)
    await streams.aclose()


async def test_unavailable_engine_propagates():
    streams = ChoiceStreams(EchoEngineClient(workers=0), [choice(0, [1]), choice(1, [1])],
                            Context())
    with pytest.raises(EngineUnavailable):
        async for _ in streams:
            pass
    await streams.aclose()
