"""Models come from discovery: worker model entries become served model pools.

The first worker registering a model name creates its pool (tokenizer, template,
a KV-aware routed engine client); later workers of the same name join it; a
worker whose card conflicts with its pool (other tokenizer) is refused with a
logged reason; when the last worker leaves, the model is no longer listed.
Each pool's request pipeline (route, optional prefill stage, migration) is assembled by
frontend.pipeline. Workers registered with role "prefill" form the model's prefill pool
instead (frontend.disagg_pools); with one, requests are prefilled there first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from kvflow.frontend.disagg import DisaggConfig, DisaggStats
from kvflow.frontend.disagg_pools import DisaggPools
from kvflow.frontend.engine_client import EngineClient
from kvflow.frontend.models import ModelManager
from kvflow.frontend.pipeline import MigrationSettings, build_pipeline
from kvflow.frontend.routed import RoutedEngineClient
from kvflow.llm.model_card import ModelCard, materialize_card
from kvflow.llm.register import (
    MODELS_PREFIX,
    ROLE_PREFILL,
    ModelEntry,
    block_size_conflict,
    fetch_card_file,
)
from kvflow.router.config import KvRouterConfig
from kvflow.router.service import KvRoutedClient, RouterWiring
from kvflow.runtime import DistributedRuntime
from kvflow.runtime.discovery.base import PUT
from kvflow.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass
class ModelPool:
    card: ModelCard
    routed: RoutedEngineClient
    client: EngineClient
    instances: set[str] = field(default_factory=set)
    retire: asyncio.TimerHandle | None = None  # set while its workers are restarting


def _first_instance(pool: ModelPool) -> int:
    key = next(iter(pool.instances), "/0")
    return int(key.rsplit("/", 1)[1], 16)


DEFAULT_GRACE_S = 10.0


class ModelWatcher:
    """Follows `v1/models/` in discovery and keeps a ModelManager in step."""

    def __init__(
        self,
        runtime: DistributedRuntime,
        models: ModelManager,
        router_config: KvRouterConfig,
        cache_dir: str | None = None,
        migration: MigrationSettings | None = None,
        endpoint: str | None = None,
        disagg: DisaggConfig | None = None,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self.runtime = runtime
        # Serve only models registered on this endpoint ("ns.comp.ep"); None = every model.
        self.endpoint = endpoint
        # A model whose last worker left stays listed this long (503 + Retry-After meanwhile).
        self.grace_s = grace_s
        self.models = models
        self.router_config = router_config
        self.migration = migration or MigrationSettings()
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="kvflow-cards-"))
        self.pools: dict[str, ModelPool] = {}
        self._task: asyncio.Task | None = None
        self._decode = msgspec.msgpack.Decoder(ModelEntry).decode
        self._key_model: dict[str, str] = {}
        self.disagg_config = disagg or DisaggConfig()
        self.disagg_stats = DisaggStats(runtime.metrics_registry)
        self.disagg = DisaggPools(runtime, router_config)

    async def start(self) -> None:
        watch = self.runtime.discovery.watch_prefix(MODELS_PREFIX)
        self._task = asyncio.ensure_future(self._follow(watch))

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        for pool in self.pools.values():
            if pool.retire is not None:
                pool.retire.cancel()
            await pool.routed.close()
        self.pools.clear()
        await self.disagg.close()

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
        prefill = entry.role == ROLE_PREFILL
        if self.endpoint is not None and entry.endpoint != self.endpoint and not prefill:
            return
        if not await self.disagg.admit(entry):
            return
        if prefill:
            await self.disagg.add(key, entry)
            return
        pool = self._back_from_restart(self.pools.get(entry.name), entry)
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
        elif pool.card.kv_block_size != entry.card.kv_block_size:
            log.error("frontend: refusing worker %x: %s", entry.instance_id, block_size_conflict(
                entry.name, pool.card.kv_block_size, _first_instance(pool),
                entry.card.kv_block_size))
            return
        pool.instances.add(key)
        self._key_model[key] = entry.name

    def _back_from_restart(self, pool: ModelPool | None, entry: ModelEntry) -> ModelPool | None:
        """A worker of a restarting model is back: keep the pool, unless its card changed."""
        if pool is None or pool.retire is None:
            return pool
        pool.retire.cancel()
        pool.retire = None
        self.models.clear_restarting(entry.name)
        if pool.card.checksum == entry.card.checksum:
            log.info("frontend: model %s has a worker again (%x)", entry.name, entry.instance_id)
            return pool
        del self.pools[entry.name]
        asyncio.ensure_future(pool.routed.close())
        return None

    async def _new_pool(self, entry: ModelEntry) -> ModelPool:
        card = await self._local_card(entry)
        ns, component, endpoint = entry.endpoint.split(".")
        wiring = RouterWiring(namespace=ns, component=component, generate_endpoint=endpoint)
        routed = await KvRoutedClient.start(self.runtime, self._router_config(card), wiring)
        name = card.name
        pipe = build_pipeline(card, routed, self.migration,
                              lambda: self.disagg.prefill_for(name), self.disagg_config,
                              self.disagg_stats)
        await asyncio.to_thread(functools.partial(
            self.models.add_model, card, pipe.client, explain=pipe.split.explain,
            fleet=pipe.split.fleet))
        return ModelPool(card, pipe.routed, pipe.client)

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
        if await self.disagg.remove(key):
            return
        name = self._key_model.pop(key, None)
        pool = self.pools.get(name or "")
        if pool is None:
            return
        pool.instances.discard(key)
        if pool.instances or pool.retire is not None:
            return
        if self.grace_s <= 0:
            await self._retire(name or "", pool)
            return
        log.info("frontend: model %s has no workers left; waiting %.0f s for one to come back",
                 name, self.grace_s)
        self.models.mark_restarting(name or "", self.grace_s)
        pool.retire = asyncio.get_running_loop().call_later(
            self.grace_s, lambda: asyncio.ensure_future(self._retire(name or "", pool)))

    async def _retire(self, name: str, pool: ModelPool) -> None:
        if self.pools.get(name) is not pool or pool.instances:
            return
        del self.pools[name]
        self.models.remove_model(name)
        await pool.routed.close()
        log.info("frontend: model %s has no workers left; no longer listed", name)
