"""The engine contract, run against every engine: generate, stop, abort, KV events, metrics, shutdown.

Each engine is built the way `kvflow worker` builds it (parsed CLI args, the
registry, the worker's generate handler). The `vllm` case runs only under the
vLLM venv's Python (`bash scripts/dev.sh engine vllm`; `-m vllm`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from kvflow.engines.base import EngineHooks, get_engine
from kvflow.engines.worker import engine_facts, generate_handler, parse_args, worker_args
from kvflow.llm.kv_events import KvEvent, LoadMetrics
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.llm.protocol import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineOutput,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from kvflow.router.indexer import KvIndex
from kvflow.runtime.context import Context
from kvflow.testing.engine_io import prompt_ids

WORKER_ID = 7
BLOCK = 4


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# engine name -> (extra worker args, marks)
CASES: dict[str, tuple[list[str], list]] = {
    "echo": (["--echo-repeat"], []),
    "mocker": (["--block-size", str(BLOCK), "--num-gpu-blocks", "64", "--speedup-ratio", "1000"], []),
    "native": (
        ["--device", "cpu", "--block-size", str(BLOCK), "--num-gpu-blocks", "128", "--max-num-seqs", "4"],
        [pytest.mark.skipif(not _has("torch"), reason="torch not installed")],
    ),
    "vllm": (
        ["--", "--block-size", "32", "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager",
         "--dtype", "float32"],
        [pytest.mark.vllm, pytest.mark.skipif(not _has("vllm"), reason="no vllm (dev.sh engine vllm)")],
    ),
}


@dataclass
class Published:
    events: list[KvEvent] = field(default_factory=list)
    loads: list[LoadMetrics] = field(default_factory=list)

    def hooks(self) -> EngineHooks:
        return EngineHooks(WORKER_ID, self.events.extend, self.loads.append)


@dataclass
class Harness:
    engine: object
    handler: Callable
    kv_events: bool
    block_size: int | None
    published: Published
    stopped: bool = False

    async def run(self, req: PreprocessedRequest, ctx: Context | None = None) -> list[EngineOutput]:
        return [out async for out in self.handler(req, ctx or Context())]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _has("torch"):
        return tmp_path_factory.mktemp("no-model")  # echo and mocker read no weights
    from kvflow.testing.models import make_tiny_model

    # head_dim 64: vLLM's CPU attention supports 32, 64, 80, ... but not the default 16.
    path = tmp_path_factory.mktemp("contract") / "llama"
    return make_tiny_model(path, "llama", hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=256)


# One engine per module and case (vLLM takes a minute or two to start here); the
# shutdown test runs last and stops it.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(
    scope="module", loop_scope="module",
    params=[pytest.param(name, marks=marks) for name, (_, marks) in CASES.items()],
)
async def harness(request: pytest.FixtureRequest, model_dir: Path):
    name = request.param
    if name == "vllm":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is larger
    ns = parse_args(["--engine", name, "--model-path", str(model_dir), *CASES[name][0]])
    published = Published()
    spec = get_engine(name)
    engine = spec.build(ns, published.hooks())
    await engine.start()
    facts = engine_facts(engine, spec, ns, worker_args(ns))
    harness = Harness(engine, generate_handler(engine, None), facts.kv_events, facts.kv_block_size, published)
    yield harness
    if not harness.stopped:
        await asyncio.wait_for(engine.stop(), 60)


def req(rid: str, prompt: list[int], max_tokens: int, **stop: object) -> PreprocessedRequest:
    return PreprocessedRequest(
        rid, prompt, sampling=SamplingOptions(temperature=0.0, seed=0),
        stop=StopConditions(max_tokens=max_tokens, **stop),  # type: ignore[arg-type]
    )


def tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def test_generate_streams_to_max_tokens(harness: Harness) -> None:
    outs = await harness.run(req("g", prompt_ids(12, 1), 5, ignore_eos=True))
    assert len(tokens(outs)) == 5
    assert outs[-1].finish_reason == FINISH_LENGTH
    assert all(o.finish_reason is None for o in outs[:-1])
    assert all(o.error is None for o in outs)


async def test_stop_token_ends_the_stream(harness: Harness) -> None:
    prompt = prompt_ids(12, 2)
    first = tokens(await harness.run(req("s1", prompt, 6, ignore_eos=True)))
    stop_at = first.index(first[2])  # the first occurrence of the third token
    outs = await harness.run(req("s2", prompt, 6, ignore_eos=True, stop_token_ids=[first[2]]))
    assert outs[-1].finish_reason == FINISH_STOP
    assert tokens(outs)[:stop_at] == first[:stop_at]
    assert len(tokens(outs)) <= stop_at + 1


async def test_abort_ends_the_stream_and_frees_the_engine(harness: Harness) -> None:
    ctx = Context()
    outs: list[EngineOutput] = []
    async for out in harness.handler(req("a", prompt_ids(12, 3), 200, ignore_eos=True), ctx):
        outs.append(out)
        if len(outs) == 2:
            ctx.stop_generating()
    assert outs[-1].finish_reason == FINISH_CANCELLED
    assert len(tokens(outs)) < 200
    after = await harness.run(req("a2", prompt_ids(12, 4), 3, ignore_eos=True))
    assert len(tokens(after)) == 3  # the engine still serves
    if harness.published.loads:
        await _until(lambda: harness.published.loads[-1].num_running == 0, "the aborted request to leave")


async def test_kv_events_round_trip_into_the_router_index(harness: Harness) -> None:
    if not harness.kv_events:
        assert harness.published.events == []
        pytest.skip("engine publishes no KV events")
    assert harness.block_size is not None
    prompt = prompt_ids(4 * harness.block_size + 1, 5)
    await harness.run(req("k", prompt, 2, ignore_eos=True))
    hashes = sequence_hashes(prompt, harness.block_size)

    def held() -> int:
        return _indexed(list(harness.published.events)).find_matches(hashes).score(WORKER_ID)

    await _until(lambda: held() == 4, "the prompt's 4 blocks in the index")
    again = await harness.run(req("k2", prompt, 2, ignore_eos=True))
    assert again[0].cached_tokens is not None and again[0].cached_tokens >= 4 * harness.block_size


async def test_load_metrics_describe_the_cache(harness: Harness) -> None:
    await harness.run(req("m", prompt_ids(12, 6), 3, ignore_eos=True))
    if not harness.kv_events:
        pytest.skip("engine has no KV cache to report")
    await _until(lambda: bool(harness.published.loads), "a LoadMetrics")
    load = harness.published.loads[-1]
    assert load.worker_id == WORKER_ID and load.total_blocks > 0
    assert 0 <= load.active_blocks <= load.total_blocks


async def test_stop_is_clean_and_idempotent_for_new_work(harness: Harness) -> None:
    await harness.run(req("c", prompt_ids(8, 7), 2, ignore_eos=True))
    before = asyncio.all_tasks()
    harness.stopped = True
    await asyncio.wait_for(harness.engine.stop(), 60)  # type: ignore[attr-defined]
    await asyncio.sleep(0.05)
    leftover = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert leftover == [], f"tasks left running after stop(): {leftover}"


def _indexed(events: list[KvEvent]) -> KvIndex:
    """A fresh router index fed `events` in order."""
    index = KvIndex()
    for event in events:
        assert not index.apply(event).needs_recovery, f"event gap at {event.event_id}"
    return index


async def _until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
