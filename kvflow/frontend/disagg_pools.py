"""The prefill pools of disaggregated models, and the KV layout check between their workers.

Workers registered with role "prefill" do not serve clients; they form, per model, a
pool behind its own KV router (a `RoutedEngineClient`) that frontend.disagg prefills on.
Every prefill or decode worker's KV layout (its transfer agent's `AgentInfo`, published
before its model entry) must match the model's first one: a worker that differs is
refused at registration with a log line naming both values (block size, heads, dtype...).
Heads are counted over all of a tensor-parallel worker's ranks (`AgentInfo.shards`), so
prefill and decode workers of different TP sizes are one pool (the transfer re-slices).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import msgspec

from kvflow.frontend.routed import RoutedEngineClient
from kvflow.kv.heads import whole_layout
from kvflow.kv.layout import KvLayout, layout_mismatches
from kvflow.kv.transfer.messages import AgentInfo, agent_key
from kvflow.llm.register import ROLE_AGGREGATED, ROLE_PREFILL, ModelEntry
from kvflow.router.config import KvRouterConfig
from kvflow.router.service import KvRoutedClient, RouterWiring
from kvflow.runtime import DistributedRuntime

log = logging.getLogger(__name__)


@dataclass
class PrefillPool:
    client: RoutedEngineClient
    instances: set[str] = field(default_factory=set)


class DisaggPools:
    """Prefill pools by model name, and each model's reference KV layout."""

    def __init__(self, runtime: DistributedRuntime, router_config: KvRouterConfig) -> None:
        self.runtime = runtime
        self.router_config = router_config
        self.pools: dict[str, PrefillPool] = {}
        self.layouts: dict[str, tuple[int, KvLayout]] = {}  # model -> (first worker, layout)
        self._key_model: dict[str, str] = {}

    def prefill_for(self, model: str) -> RoutedEngineClient | None:
        pool = self.pools.get(model)
        return pool.client if pool is not None else None

    async def admit(self, entry: ModelEntry) -> bool:
        """Check a disaggregated worker's KV layout against its model's; False: refused."""
        if entry.role == ROLE_AGGREGATED:
            return True
        namespace = entry.endpoint.split(".", 1)[0]
        raw = await self.runtime.discovery.get(agent_key(namespace, entry.instance_id))
        if raw is None:
            log.error("frontend: refusing %s worker %x for model %s: it published no KV transfer "
                      "agent; start it with this kvflow version", entry.role, entry.instance_id,
                      entry.name)
            return False
        info = msgspec.msgpack.decode(raw, type=AgentInfo)
        layout = whole_layout(info.layout, info.shards)  # tensor parallel: all ranks' heads
        first = self.layouts.setdefault(entry.name, (entry.instance_id, layout))
        problems = layout_mismatches(layout, first[1])
        if problems:
            log.error("frontend: refusing %s worker %x for model %s: its KV layout differs from "
                      "worker %x's (%s); all prefill and decode workers of a model need the same "
                      "--block-size and KV dtype", entry.role, entry.instance_id, entry.name,
                      first[0], "; ".join(p.replace("this worker", "new").replace("peer", "pool's")
                                          for p in problems))
            return False
        return True

    async def add(self, key: str, entry: ModelEntry) -> None:
        """A prefill worker joins its model's prefill pool (created on the first one)."""
        assert entry.role == ROLE_PREFILL
        pool = self.pools.get(entry.name)
        if pool is None:
            ns, component, endpoint = entry.endpoint.split(".")
            wiring = RouterWiring(namespace=ns, component=component, generate_endpoint=endpoint)
            config = dataclasses.replace(self.router_config, block_size=entry.card.kv_block_size)
            routed = await KvRoutedClient.start(self.runtime, config, wiring)
            pool = self.pools[entry.name] = PrefillPool(RoutedEngineClient(routed))
            log.info("frontend: model %s has prefill workers (first %x): disaggregated serving",
                     entry.name, entry.instance_id)
        pool.instances.add(key)
        self._key_model[key] = entry.name

    async def remove(self, key: str) -> bool:
        """A registration went away; True if it was a prefill worker's."""
        name = self._key_model.pop(key, None)
        if name is None:
            return False
        pool = self.pools[name]
        pool.instances.discard(key)
        if not pool.instances:
            del self.pools[name]
            await pool.client.close()
            log.info("frontend: model %s has no prefill workers left: aggregated serving", name)
        return True

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.client.close()
        self.pools.clear()
