"""register_llm → discovery → the frontend's model pools (in one process, real TCP)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kvflow.engines.base import EngineHooks
from kvflow.engines.echo import EchoConfig, EchoEngine
from kvflow.frontend.models import ModelManager
from kvflow.frontend.watcher import ModelWatcher
from kvflow.llm.protocol import PreprocessedRequest
from kvflow.llm.register import ModelInput, ModelType, register_llm
from kvflow.router.config import KvRouterConfig
from kvflow.runtime import Context, DistributedRuntime, RuntimeConfig
from kvflow.testing.tokenizer import make_model_dir


async def _wait(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


@pytest.fixture
async def runtimes():
    cfg = RuntimeConfig(discovery="memory", event_plane="inproc", namespace="reg")
    worker, frontend = (await DistributedRuntime(cfg).start(), await DistributedRuntime(cfg).start())
    yield worker, frontend
    await frontend.shutdown()
    await worker.shutdown()


async def _serve_echo(runtime: DistributedRuntime, component: str, model_dir, name: str, **kw):
    ep = runtime.namespace("reg").component(component).endpoint("generate")
    entry = await register_llm(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, ep,
                               str(model_dir), model_name=name, **kw)
    engine = EchoEngine(EchoConfig(), EngineHooks())
    task = asyncio.ensure_future(ep.serve(engine.generate, request_type=PreprocessedRequest))
    return entry, task


async def test_large_card_files_are_fetched_from_the_worker(runtimes, tmp_path) -> None:
    worker, frontend = runtimes
    model_dir = make_model_dir(tmp_path / "m")
    entry, task = await _serve_echo(worker, "backend", model_dir, "big", inline_limit=64)
    assert entry.files_endpoint and entry.card.files["tokenizer.json"].inline is None
    models = ModelManager()
    watcher = ModelWatcher(frontend, models, KvRouterConfig(), cache_dir=str(tmp_path / "cache"))
    await watcher.start()
    await _wait(lambda: models.get("big") is not None)
    served = models.get("big")
    assert served.tokenizer.checksum == entry.card.tokenizer_checksum
    ids = served.tokenizer.encode("hello")
    request = PreprocessedRequest("r1", ids, model="big")
    got = [t async for out in served.engine.generate(request, Context()) for t in out.token_ids]
    assert got == ids
    await watcher.close()
    worker.initiate_shutdown()
    await task


async def test_conflicting_card_is_refused(runtimes, tmp_path, caplog) -> None:
    worker, frontend = runtimes
    models = ModelManager()
    watcher = ModelWatcher(frontend, models, KvRouterConfig(), cache_dir=str(tmp_path / "cache"))
    await watcher.start()
    _, t1 = await _serve_echo(worker, "a", make_model_dir(tmp_path / "one"), "same")
    await _wait(lambda: models.get("same") is not None)
    other = make_model_dir(tmp_path / "two", vocab_size=600)  # a different tokenizer
    caplog.set_level(logging.ERROR, logger="kvflow.frontend.watcher")
    second = DistributedRuntime(RuntimeConfig(discovery="memory", event_plane="inproc",
                                              namespace="reg"))
    await second.start()
    _, t2 = await _serve_echo(second, "b", other, "same")
    await _wait(lambda: any("refusing worker" in r.getMessage() for r in caplog.records))
    pool = watcher.pools["same"]
    assert len(pool.instances) == 1
    await watcher.close()
    await second.shutdown()
    worker.initiate_shutdown()
    await asyncio.gather(t1, t2)
