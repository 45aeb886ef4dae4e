"""Pure routing math: the cost of sending a request to each worker, and picking one.

    cost(w) = prefill_load_scale * (new prefill blocks on w + queued prefill blocks on w)
              + active decode blocks on w

where new prefill blocks are the request's blocks minus those w already caches. Lower
is better. Randomness comes in through an injected `random.Random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import msgspec

from kvflow.router.load import WorkerLoad


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

    def as_json(self) -> bytes:
        """JSON for the explain endpoint: worker ids in hex, as in logs and metrics."""
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["worker_id"] = f"{self.worker_id:x}"
        for name in ("costs", "overlaps"):
            body[name] = {f"{w:x}": v for w, v in body[name].items()}
        body["loads"] = {f"{w:x}": {**load._asdict(), "worker_id": f"{w:x}"}
                         for w, load in self.loads.items()}
        return msgspec.json.encode(body)


def prefill_blocks(num_tokens: int, overlap_blocks: int, block_size: int) -> float:
    """Blocks of prompt a worker must still compute given its cached prefix."""
    return max(num_tokens - overlap_blocks * block_size, 0) / block_size


def worker_cost(
    num_tokens: int, overlap_blocks: int, load: WorkerLoad, block_size: int, prefill_load_scale: float
) -> float:
    new_prefill = prefill_blocks(num_tokens, overlap_blocks, block_size)
    queued_prefill = load.prefill_tokens / block_size
    return prefill_load_scale * (new_prefill + queued_prefill) + load.decode_blocks


def load_cost(load: WorkerLoad, block_size: int, prefill_load_scale: float) -> float:
    """A worker's cost ignoring the request itself: what least-loaded routing minimizes."""
    return prefill_load_scale * load.prefill_tokens / block_size + load.decode_blocks


def kv_costs(
    num_tokens: int,
    overlaps: Mapping[int, int],
    loads: Mapping[int, WorkerLoad],
    block_size: int,
    prefill_load_scale: float,
) -> dict[int, float]:
    """Cost per worker in `loads` (workers absent from `overlaps` cache nothing)."""
    return {
        w: worker_cost(num_tokens, overlaps.get(w, 0), load, block_size, prefill_load_scale)
        for w, load in loads.items()
    }


def select_worker(costs: Mapping[int, float], temperature: float, rng: random.Random) -> int:
    """The cheapest worker (ties at random), or a softmax sample when temperature > 0."""
    if not costs:
        raise ValueError("select_worker needs at least one candidate worker")
    if temperature <= 0:
        return _cheapest(costs, rng)
    return _softmax_sample(costs, temperature, rng)


def _cheapest(costs: Mapping[int, float], rng: random.Random) -> int:
    best = min(costs.values())
    tied = sorted(w for w, c in costs.items() if math.isclose(c, best, rel_tol=1e-9, abs_tol=1e-9))
    return tied[0] if len(tied) == 1 else rng.choice(tied)


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
