"""Models come from discovery: worker model entries become served model pools.

The first worker registering a model name creates its pool (tokenizer, template,
a KV-aware routed engine client); later workers of the same name join it; a
worker whose card conflicts with its pool (other tokenizer) is refused with a
logged reason; when the last worker leaves, the model is no longer listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from kvflow.frontend.engine_client import EngineUnavailable
from kvflow.frontend.models import ModelManager
from kvflow.llm.model_card import ModelCard, materialize_card
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.llm.register import MODELS_PREFIX, ModelEntry, fetch_card_file
from kvflow.router.config import KvRouterConfig
from kvflow.router.errors import RouterOverloadedError
from kvflow.router.service import KvRoutedClient, RouterWiring
from kvflow.runtime import Context, DistributedRuntime, NoInstancesError, WorkerUnavailableError
from kvflow.runtime.discovery.base import PUT

log = logging.getLogger(__name__)


class RoutedEngineClient:
    """EngineClient over the runtime: routing by policy, errors mapped for the frontend."""

    def __init__(self, routed: KvRoutedClient) -> None:
        self.routed = routed

    async def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]:
        if self.routed.live_workers() == 0:
            raise EngineUnavailable("no live worker")
        try:
            async for out in self.routed.generate(request, context):
                yield out
        except RouterOverloadedError as exc:
            raise EngineUnavailable(f"all workers are busy; retry in {exc.retry_after_s:.0f}s") from exc
        except (NoInstancesError, WorkerUnavailableError) as exc:
            raise EngineUnavailable(str(exc)) from exc

    def live_workers(self) -> int:
        return self.routed.live_workers()


@dataclass
class ModelPool:
    card: ModelCard
    client: RoutedEngineClient
    instances: set[str] = field(default_factory=set)


class ModelWatcher:
    """Follows `v1/models/` in discovery and keeps a ModelManager in step."""

    def __init__(
        self,
        runtime: DistributedRuntime,
        models: ModelManager,
        router_config: KvRouterConfig,
        cache_dir: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.models = models
        self.router_config = router_config
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="kvflow-cards-"))
        self.pools: dict[str, ModelPool] = {}
        self._task: asyncio.Task | None = None
        self._decode = msgspec.msgpack.Decoder(ModelEntry).decode
        self._key_model: dict[str, str] = {}

    async def start(self) -> None:
        watch = self.runtime.discovery.watch_prefix(MODELS_PREFIX)
        self._task = asyncio.ensure_future(self._follow(watch))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pool in self.pools.values():
            await pool.client.routed.close()
        self.pools.clear()

    async def _follow(self, watch: Any) -> None:
        async for event in watch:
            try:
                if event.kind == PUT:
                    await self._on_put(event.key, self._decode(event.value))
                else:
                    await self._on_delete(event.key)
            except Exception:
                log.exception("frontend: failed to apply model event for %s", event.key)

    async def _on_put(self, key: str, entry: ModelEntry) -> None:
        pool = self.pools.get(entry.name)
        if pool is None:
            pool = await self._new_pool(entry)
            self.pools[entry.name] = pool
            log.info("frontend: serving model %s (first worker %x)", entry.name, entry.instance_id)
        elif pool.card.tokenizer_checksum != entry.card.tokenizer_checksum:
            log.error(
                "frontend: refusing worker %x for model %s: its tokenizer (checksum %s) differs "
                "from the pool's (%s); serve it under another --model-name",
                entry.instance_id,
                entry.name,
                entry.card.tokenizer_checksum[:12],
                pool.card.tokenizer_checksum[:12],
            )
            return
        pool.instances.add(key)
        self._key_model[key] = entry.name

    async def _new_pool(self, entry: ModelEntry) -> ModelPool:
        card = await self._local_card(entry)
        ns, component, endpoint = entry.endpoint.split(".")
        wiring = RouterWiring(namespace=ns, component=component, generate_endpoint=endpoint)
        routed = await KvRoutedClient.start(self.runtime, self._router_config(card), wiring)
        client = RoutedEngineClient(routed)
        await asyncio.to_thread(self.models.add_model, card, client)
        return ModelPool(card, client)

    def _router_config(self, card: ModelCard) -> KvRouterConfig:
        return dataclasses.replace(self.router_config, block_size=card.kv_block_size)

    async def _local_card(self, entry: ModelEntry) -> ModelCard:
        card = entry.card
        remote = {ref.sha256 for ref in card.files.values() if ref.inline is None}
        if not remote:
            return card
        fetched = {sha: await fetch_card_file(self.runtime, entry, sha) for sha in remote}
        dest = self.cache_dir / card.checksum[:16]
        await asyncio.to_thread(materialize_card, card, dest, fetched.__getitem__)
        return msgspec.structs.replace(card, model_path=str(dest))

    async def _on_delete(self, key: str) -> None:
        name = self._key_model.pop(key, None)
        pool = self.pools.get(name or "")
        if pool is None:
            return
        pool.instances.discard(key)
        if not pool.instances:
            del self.pools[name]  # type: ignore[arg-type]
            self.models.remove_model(name)  # type: ignore[arg-type]
            await pool.client.routed.close()
            log.info("frontend: model %s has no workers left; no longer listed", name)
