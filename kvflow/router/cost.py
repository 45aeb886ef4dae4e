"""Pure routing math: the cost of sending a request to each worker, and picking one.

Costs are in one unit, blocks of prefill work (a block's prefill time):

    cost(w) = wait(w) + prefill(w) + decode(w)
    wait(w)    = prefill_load_scale * prefill blocks already queued on w
    prefill(w) = prefill_load_scale * (request blocks - blocks w caches or will cache)
    decode(w)  = decode_load_scale * active decode blocks on w

so the prefill an overlap saves is weighed against the queueing it adds, and a request
spills off the worker holding its prefix only when the wait there costs more than the
recompute elsewhere. Decode blocks weigh little (`decode_load_scale`, default 0.1):
a decode block slows each engine step by reading its KV, far less than a block of
prefill compute. Lower is better. Ties go to the highest rendezvous hash of (prefix
key, worker), so equal candidates are picked deterministically, the same way by every
router replica, and different prefixes spread over the workers. Randomness (softmax
sampling when temperature > 0) comes in through an injected `random.Random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import msgspec

from kvflow.router.load import WorkerLoad


class CostTerms(NamedTuple):
    """One worker's cost for one request, in blocks of prefill work (see the module doc)."""

    wait: float
    prefill: float
    # Prompt blocks the worker's cache (exact, pending or session history) spares it.
    saved: float
    decode: float

    @property
    def total(self) -> float:
        return self.wait + self.prefill + self.decode


@dataclass(frozen=True)
class CostWeights:
    """The knobs of the cost (from `KvRouterConfig`)."""

    block_size: int
    prefill_load_scale: float = 1.0
    decode_load_scale: float = 0.1


@dataclass(frozen=True)
class RoutingDecision:
    """Where a request goes and why; also the answer of the router's explain endpoint."""

    worker_id: int
    # Leading prompt blocks the chosen worker already caches.
    overlap_blocks: int
    # Full KV blocks in the prompt, and prompt length in tokens.
    request_blocks: int
    num_tokens: int
    # Fraction of prompt tokens expected to be served from the chosen worker's cache.
    predicted_hit_rate: float
    policy: str
    # Per candidate worker: cost (lower is better; empty for policies without one),
    # overlap in blocks, and the load considered.
    costs: dict[int, float] = field(default_factory=dict)
    overlaps: dict[int, int] = field(default_factory=dict)
    loads: dict[int, WorkerLoad] = field(default_factory=dict)
    # kv policy: each candidate's cost terms (wait, prefill, saved, decode).
    terms: dict[int, CostTerms] = field(default_factory=dict)
    # Of `overlaps`, blocks booked as pending (routed there, not yet confirmed by events).
    pending: dict[int, int] = field(default_factory=dict)
    # The worker holding the request's session history, and how many prompt blocks of it.
    session_worker: int | None = None
    session_blocks: int = 0

    def as_json(self) -> bytes:
        """JSON for the explain endpoint: worker ids in hex, as in logs and metrics."""
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["worker_id"] = f"{self.worker_id:x}"
        for name in ("costs", "overlaps", "pending"):
            body[name] = {f"{w:x}": v for w, v in body[name].items()}
        if self.session_worker is not None:
            body["session_worker"] = f"{self.session_worker:x}"
        body["loads"] = {f"{w:x}": {**load._asdict(), "worker_id": f"{w:x}"}
                         for w, load in self.loads.items()}
        body["terms"] = {f"{w:x}": {**t._asdict(), "total": t.total} for w, t in self.terms.items()}
        return msgspec.json.encode(body)


def prefill_blocks(num_tokens: int, overlap_blocks: int, block_size: int) -> float:
    """Blocks of prompt a worker must still compute given its cached prefix."""
    return max(num_tokens - overlap_blocks * block_size, 0) / block_size


def cost_terms(num_tokens: int, overlap_blocks: int, load: WorkerLoad,
               weights: CostWeights) -> CostTerms:
    """The cost of sending a `num_tokens` prompt to a worker caching `overlap_blocks` of it."""
    bs, scale = weights.block_size, weights.prefill_load_scale
    new = prefill_blocks(num_tokens, overlap_blocks, bs)
    return CostTerms(
        wait=scale * load.prefill_tokens / bs,
        prefill=scale * new,
        saved=scale * (num_tokens / bs - new),
        decode=weights.decode_load_scale * load.decode_blocks,
    )


def worker_cost(
    num_tokens: int, overlap_blocks: int, load: WorkerLoad, block_size: int,
    prefill_load_scale: float, decode_load_scale: float = 1.0,
) -> float:
    weights = CostWeights(block_size, prefill_load_scale, decode_load_scale)
    return cost_terms(num_tokens, overlap_blocks, load, weights).total


def load_cost(load: WorkerLoad, block_size: int, prefill_load_scale: float,
              decode_load_scale: float = 1.0) -> float:
    """A worker's cost ignoring the request itself: what least-loaded routing minimizes."""
    return prefill_load_scale * load.prefill_tokens / block_size + (
        decode_load_scale * load.decode_blocks)


def kv_costs(
    num_tokens: int,
    overlaps: Mapping[int, int],
    loads: Mapping[int, WorkerLoad],
    block_size: int,
    prefill_load_scale: float,
    decode_load_scale: float = 1.0,
) -> dict[int, float]:
    """Cost per worker in `loads` (workers absent from `overlaps` cache nothing)."""
    weights = CostWeights(block_size, prefill_load_scale, decode_load_scale)
    return {w: t.total for w, t in kv_terms(num_tokens, overlaps, loads, weights).items()}


def kv_cost_totals(num_tokens: int, overlaps: Mapping[int, int],
                   loads: Mapping[int, WorkerLoad], weights: CostWeights) -> dict[int, float]:
    """`kv_terms(...)[w].total` per worker, without building the terms (the hot path)."""
    bs, scale, dscale = weights.block_size, weights.prefill_load_scale, weights.decode_load_scale
    costs: dict[int, float] = {}
    for w, load in loads.items():
        new = num_tokens - overlaps.get(w, 0) * bs
        costs[w] = scale * (load.prefill_tokens + (new if new > 0 else 0)) / bs + (
            dscale * load.decode_blocks)
    return costs


def kv_terms(num_tokens: int, overlaps: Mapping[int, int], loads: Mapping[int, WorkerLoad],
             weights: CostWeights) -> dict[int, CostTerms]:
    """Cost terms per worker in `loads` (workers absent from `overlaps` cache nothing)."""
    return {w: cost_terms(num_tokens, overlaps.get(w, 0), load, weights)
            for w, load in loads.items()}


TieKey = Callable[[int], int]


def select_worker(costs: Mapping[int, float], temperature: float, rng: random.Random,
                  tie_key: TieKey | None = None) -> int:
    """The cheapest worker, or a softmax sample when temperature > 0.

    Ties go to the highest `tie_key(worker)` when given, else to a random tied worker.
    """
    if not costs:
        raise ValueError("select_worker needs at least one candidate worker")
    if temperature <= 0:
        return _cheapest(costs, rng, tie_key)
    return _softmax_sample(costs, temperature, rng)


def _cheapest(costs: Mapping[int, float], rng: random.Random, tie_key: TieKey | None) -> int:
    best = min(costs.values())
    tied = sorted(w for w, c in costs.items() if math.isclose(c, best, rel_tol=1e-9, abs_tol=1e-9))
    if len(tied) == 1:
        return tied[0]
    return max(tied, key=tie_key) if tie_key is not None else rng.choice(tied)


def rendezvous(key: int, worker_id: int) -> int:
    """A score of (key, worker) for rendezvous hashing: the tuple's hash, which for ints
    is the same in every process (no hash randomization) and costs one C call."""
    return hash((key, worker_id))


def softmax_probabilities(costs: Mapping[int, float], temperature: float) -> dict[int, float]:
    """P(w) ∝ exp(-normalized_cost(w) / temperature), costs normalized to [0, 1]."""
    assert temperature > 0
    low, high = min(costs.values()), max(costs.values())
    span = high - low
    if span <= 0:
        return {w: 1.0 / len(costs) for w in costs}
    weights = {w: math.exp(-((c - low) / span) / temperature) for w, c in costs.items()}
    total = sum(weights.values())
    return {w: weight / total for w, weight in weights.items()}


def _softmax_sample(costs: Mapping[int, float], temperature: float, rng: random.Random) -> int:
    probs = softmax_probabilities(costs, temperature)
    workers = sorted(probs)
    x = rng.random()
    acc = 0.0
    for w in workers:
        acc += probs[w]
        if x < acc:
            return w
    return workers[-1]


def predicted_hit_rate(overlap_blocks: int, num_tokens: int, block_size: int) -> float:
    if num_tokens <= 0:
        return 0.0
    return min(overlap_blocks * block_size, num_tokens) / num_tokens
