"""Routing policies, registered by name: kv, round_robin, random, least_loaded, direct.

A policy is a pure function of a `RoutingSnapshot` (plus an injected rng): it never
reads or changes router state, so `explain` can run it without side effects.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from kvflow.router.blocks import OverlapScores
from kvflow.router.config import KvRouterConfig
from kvflow.router.cost import (
    CostTerms,
    CostWeights,
    kv_cost_totals,
    kv_terms,
    load_cost,
    rendezvous,
    select_worker,
)
from kvflow.router.errors import UnknownWorkerError
from kvflow.router.load import WorkerLoad


@dataclass(frozen=True)
class RoutingSnapshot:
    """What a policy may look at for one request."""

    num_tokens: int
    # Candidate workers (eligible now) and their load; keys are the candidates.
    loads: dict[int, WorkerLoad]
    overlaps: OverlapScores = field(default_factory=OverlapScores)
    # Decisions this router made before this one (round-robin position).
    decisions_made: int = 0
    # The worker the request names itself (RoutingHints.worker_id), if any.
    pinned_worker: int | None = None
    # Session affinity: the worker holding the request's session history and how many of
    # its leading prompt blocks that history covers (0: it no longer matches the prompt).
    session_worker: int | None = None
    session_blocks: int = 0
    # Breaks ties between equally cheap workers (the prompt's first block hash).
    prefix_key: int = 0

    def overlap_scores(self) -> dict[int, int]:
        """Cached leading blocks per worker: the index's, raised to the session history."""
        scores = self.overlaps.scores
        w = self.session_worker
        if w is None or w not in self.loads or self.session_blocks <= scores.get(w, 0):
            return scores
        return {**scores, w: self.session_blocks}


@dataclass(frozen=True)
class PolicyChoice:
    worker_id: int
    costs: dict[int, float] = field(default_factory=dict)


class RouterPolicy(Protocol):
    name: str

    def select(self, snapshot: RoutingSnapshot, rng: random.Random) -> PolicyChoice: ...


PolicyFactory = Callable[[KvRouterConfig], RouterPolicy]
_POLICIES: dict[str, PolicyFactory] = {}
_T = TypeVar("_T")


def register_router_policy(name: str) -> Callable[[_T], _T]:
    """Class decorator: make the policy constructible by name from a `KvRouterConfig`."""

    def register(cls: _T) -> _T:
        assert name not in _POLICIES, f"router policy {name!r} registered twice"
        _POLICIES[name] = cls  # type: ignore[assignment]
        return cls

    return register


def router_policy_names() -> list[str]:
    return sorted(_POLICIES)


def build_router_policy(config: KvRouterConfig) -> RouterPolicy:
    factory = _POLICIES.get(config.policy)
    if factory is None:
        raise ValueError(
            f"unknown router policy {config.policy!r}; choose one of: "
            f"{', '.join(router_policy_names())}"
        )
    return factory(config)


@register_router_policy("kv")
@dataclass(frozen=True)
class KvPolicy:
    """Cheapest by wait + prefill left after the cached prefix + decode load (cost.py);
    ties by rendezvous hash of the prefix; softmax when temperature > 0."""

    config: KvRouterConfig
    name: str = "kv"

    def select(self, snapshot: RoutingSnapshot, rng: random.Random) -> PolicyChoice:
        cfg = self.config
        costs = kv_cost_totals(snapshot.num_tokens, snapshot.overlap_scores(), snapshot.loads,
                               self.weights)
        key = snapshot.prefix_key
        worker = select_worker(costs, cfg.temperature, rng, lambda w: rendezvous(key, w))
        return PolicyChoice(worker, costs)

    def terms(self, snapshot: RoutingSnapshot) -> dict[int, CostTerms]:
        """What each candidate's cost is made of (for explain; `select` sums them only)."""
        return kv_terms(snapshot.num_tokens, snapshot.overlap_scores(), snapshot.loads,
                        self.weights)

    @property
    def weights(self) -> CostWeights:
        cfg = self.config
        return CostWeights(cfg.block_size, cfg.prefill_load_scale, cfg.decode_load_scale)


@register_router_policy("least_loaded")
@dataclass(frozen=True)
class LeastLoadedPolicy:
    """Lowest load (queued prefill and active decode blocks), ignoring cache overlap."""

    config: KvRouterConfig
    name: str = "least_loaded"

    def select(self, snapshot: RoutingSnapshot, rng: random.Random) -> PolicyChoice:
        cfg = self.config
        costs = {w: load_cost(load, cfg.block_size, cfg.prefill_load_scale)
                 for w, load in snapshot.loads.items()}
        return PolicyChoice(select_worker(costs, 0.0, rng), costs)


@register_router_policy("round_robin")
@dataclass(frozen=True)
class RoundRobinPolicy:
    config: KvRouterConfig
    name: str = "round_robin"

    def select(self, snapshot: RoutingSnapshot, rng: random.Random) -> PolicyChoice:
        workers = sorted(snapshot.loads)
        return PolicyChoice(workers[snapshot.decisions_made % len(workers)])


@register_router_policy("random")
@dataclass(frozen=True)
class RandomPolicy:
    config: KvRouterConfig
    name: str = "random"

    def select(self, snapshot: RoutingSnapshot, rng: random.Random) -> PolicyChoice:
        return PolicyChoice(rng.choice(sorted(snapshot.loads)))


@register_router_policy("direct")
@dataclass(frozen=True)
class DirectPolicy:
    """The request names its worker; nothing is chosen."""

    config: KvRouterConfig
    name: str = "direct"

    def select(self, snapshot: RoutingSnapshot, rng: random.Random) -> PolicyChoice:
        worker = snapshot.pinned_worker
        if worker is None:
            raise UnknownWorkerError(
                "the router runs the 'direct' policy, so each request must name its worker "
                "(RoutingHints.worker_id); this request named none"
            )
        if worker not in snapshot.loads:
            raise UnknownWorkerError(
                f"the request names worker {worker}, which is not available; "
                f"available workers: {sorted(snapshot.loads)}"
            )
        return PolicyChoice(worker)
