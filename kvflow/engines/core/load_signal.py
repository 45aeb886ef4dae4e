"""The load a worker publishes for routers and planners: blocks in use, the queue, and the
prompt tokens still to compute (net of what its cache already holds)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvflow.llm.kv_events import LoadMetrics

if TYPE_CHECKING:
    from kvflow.engines.core.scheduler import Scheduler
    from kvflow.engines.core.sequence import Sequence

# Waiting sequences whose cached prefix `load_metrics` looks up (the rest are estimated).
LOAD_EXACT_WAITING = 32


def load_metrics(sched: Scheduler) -> LoadMetrics:
    pending = waiting_prefill_tokens(sched)
    pending += sum(
        s.num_tokens - s.num_computed_tokens
        for s in sched.running
        if s.num_tokens - s.num_computed_tokens > 1
    )
    metrics = LoadMetrics(
        worker_id=sched.pool.worker_id,
        active_blocks=sched.pool.num_active_blocks,
        total_blocks=sched.pool.num_blocks,
        num_waiting=len(sched.waiting),
        num_running=len(sched.running),
        prefill_tokens_inflight=pending,
    )
    if sched.connector is not None:
        sched.connector.fill_load_metrics(metrics)
    return metrics


def waiting_prefill_tokens(sched: Scheduler) -> int:
    """Prompt tokens the waiting queue will compute. A waiting sequence's prefix already
    cached here will not be computed: it is counted out, or a worker holding a hot
    prefix looks busiest exactly when its queue is cheapest. Walking the cache costs a
    lookup per block, so only the queue's head (`LOAD_EXACT_WAITING`, the next to be
    admitted) is walked; the rest are scaled by the head's uncached fraction."""
    total = uncached = 0
    rest = 0
    for i, s in enumerate(sched.waiting):
        left = s.num_tokens - s.num_computed_tokens
        if i < LOAD_EXACT_WAITING:
            total += left
            uncached += left - _cached_tokens(sched, s)
        else:
            rest += left
    return uncached + (round(rest * uncached / total) if total else rest)


def _cached_tokens(sched: Scheduler, seq: Sequence) -> int:
    """Prompt tokens of a not-yet-admitted `seq` the pool caches (as admission would take
    them now); 0 once admission has counted them."""
    if seq.num_computed_tokens:
        return 0
    hashes = sched.prefix_hashes(seq)
    return sched.pool.cached_prefix_blocks(hashes) * sched.config.block_size if hashes else 0
