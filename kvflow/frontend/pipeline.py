"""One served model's request pipeline, assembled from its stages (DESIGN §6.3):

    route + decode (the decode pool's KV router and streams, worker health)
      <- [prefill stage on the model's prefill pool, then KV transfer] (DisaggClient)
      <- migration of requests off lost or stalled workers (MigratingClient, outermost)

Preprocessing and postprocessing run in the HTTP handlers around the pipeline. The
discovery watcher only decides when a model's pool is created; `build_pipeline` puts
its stages together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvflow.frontend.canary import CanaryConfig
from kvflow.frontend.disagg import DisaggClient, DisaggConfig, DisaggStats
from kvflow.frontend.engine_client import EngineClient
from kvflow.frontend.migration import MigratingClient
from kvflow.frontend.routed import HealthSettings, RoutedEngineClient
from kvflow.frontend.stalls import StallConfig
from kvflow.llm.model_card import ModelCard
from kvflow.router.service import KvRoutedClient

DEFAULT_MIGRATION_LIMIT = 3


@dataclass(frozen=True)
class MigrationSettings:
    """How pools migrate requests: `limit` unless the card sets one; `on_migration(model)`."""

    limit: int = DEFAULT_MIGRATION_LIMIT
    on_migration: Callable[[str], None] | None = None
    on_stall_migration: Callable[[str], None] | None = None
    # Stall detection, canary and worker avoidance (the hooks get the model name first).
    stalls: StallConfig = field(default_factory=StallConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    on_stall: Callable[[str, str], None] | None = None
    on_canary_failure: Callable[[str], None] | None = None

    def health_for(self, model: str) -> HealthSettings:
        stall, canary = self.on_stall, self.on_canary_failure
        return HealthSettings(
            self.stalls, self.canary,
            on_stall=(lambda w: stall(model, w.stalled.kind if w.stalled else "silent"))
            if stall else None,
            on_canary_failure=(lambda _w: canary(model)) if canary else None)

    def limit_for(self, card: ModelCard) -> int:
        return card.migration_limit if card.migration_limit > 0 else self.limit


@dataclass(frozen=True)
class Pipeline:
    """A model's stages: `routed` (route + decode), `split` (with the prefill stage) and
    `client`, the whole of it as handlers call it."""

    routed: RoutedEngineClient
    split: DisaggClient
    client: EngineClient


def build_pipeline(
    card: ModelCard, router: KvRoutedClient, migration: MigrationSettings,
    prefill_pool: Callable[[], RoutedEngineClient | None], disagg: DisaggConfig,
    stats: DisaggStats,
) -> Pipeline:
    name = card.name
    routed = RoutedEngineClient(router, migration.health_for(name))
    split = DisaggClient(name, routed, prefill_pool, disagg, stats, card.kv_block_size)
    count, stalls = migration.on_migration, migration.on_stall_migration
    on_migration = (lambda: count(name)) if count is not None else None
    on_stall = (lambda: stalls(name)) if stalls is not None else None
    client = MigratingClient(split, migration.limit_for(card), on_migration, on_stall)
    return Pipeline(routed, split, client)
