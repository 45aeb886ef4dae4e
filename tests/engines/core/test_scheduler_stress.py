"""Scheduler + BlockPool under 10,000 random requests with random cancellations.

Checked every step: token budget, max_num_seqs, pool invariants; the cached-token
count of every admission against a brute-force recount over the cache contents;
the KV event stream replayed into a plain dict equals the pool's cache and snapshot;
every finish reason against the stop rule; at the end, no block is leaked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import FinishedSeq, Scheduler, SchedulerConfig, SchedulerOutput
from kvflow.engines.core.sequence import Sequence, StopRule
from kvflow.llm.kv_events import AllCleared, BlocksRemoved, BlocksStored, KvEvent
from kvflow.llm.protocol import FINISH_LENGTH, FINISH_STOP

BS = 4
BUDGET = 48
MAX_SEQS = 12
EOS = 0
STOP_ID = 1


@dataclass
class ReferenceIndex:
    """What a router would know: sequence hash -> parent hash, from events alone."""

    blocks: dict[int, int | None] = field(default_factory=dict)
    last_event_id: int = 0

    def apply(self, events: list[KvEvent]) -> set[int]:
        """Apply events in order; returns the hashes removed."""
        removed: set[int] = set()
        for event in events:
            assert event.event_id == self.last_event_id + 1, "gap or reorder in event ids"
            self.last_event_id = event.event_id
            data = event.data
            if isinstance(data, BlocksStored):
                parent = data.parent_hash
                for block in data.blocks:
                    assert block.block_hash not in self.blocks, "stored twice"
                    self.blocks[block.block_hash] = parent
                    parent = block.block_hash
            elif isinstance(data, BlocksRemoved):
                for h in data.block_hashes:
                    del self.blocks[h]
                    removed.add(h)
            elif isinstance(data, AllCleared):
                removed |= set(self.blocks)
                self.blocks.clear()
        return removed


def leading_hits(hashes: list[int], cached: set[int]) -> int:
    n = 0
    while n < len(hashes) and hashes[n] in cached:
        n += 1
    return n


def new_sequence(rng: random.Random, i: int, prefixes: list[list[int]]) -> Sequence:
    prefix = rng.choice(prefixes)[: rng.randrange(0, 33)]
    suffix = [rng.randrange(2, 60) for _ in range(rng.randrange(1 if prefix else 2, 30))]
    rule = StopRule(
        max_tokens=rng.randrange(1, 24),
        min_tokens=rng.choice([0, 0, 3]),
        stop_token_ids=frozenset({STOP_ID}) if rng.random() < 0.3 else frozenset(),
        eos_token_ids=frozenset({EOS}),
        ignore_eos=rng.random() < 0.2,
    )
    return Sequence(f"r{i}", prefix + suffix, rule)


def sample(out: SchedulerOutput, rng: random.Random) -> dict[str, list[int]]:
    # Small vocabulary so EOS and stop ids come up.
    return {s.seq.request_id: [rng.randrange(0, 40)] for s in out.scheduled if s.samples}


def check_finish(f: FinishedSeq, max_model_len: int) -> None:
    seq, rule = f.seq, f.seq.stop
    out = seq.output_token_ids
    for k, token in enumerate(out[:-1], start=1):  # nothing earlier should have stopped it
        assert rule.finish_reason(token, k) is None
    if f.reason == FINISH_STOP:
        assert len(out) >= rule.min_tokens
        assert out[-1] in rule.stop_token_ids or (out[-1] in rule.eos_token_ids and not rule.ignore_eos)
    else:
        assert f.reason == FINISH_LENGTH
        assert len(out) == rule.max_tokens or seq.num_tokens == max_model_len


def admissions(out: SchedulerOutput, waiting_ids: set[int]) -> list:
    return [s for s in out.scheduled if id(s.seq) in waiting_ids and s.seq.num_preemptions == 0]


def test_ten_thousand_random_requests_no_leaks_and_exact_accounting() -> None:
    rng = random.Random(1234)
    pool = BlockPool(96, BS, worker_id=3)
    config = SchedulerConfig(max_num_seqs=MAX_SEQS, max_num_batched_tokens=BUDGET, block_size=BS)
    sched = Scheduler(config, pool)
    prefixes = [[rng.randrange(2, 60) for _ in range(32)] for _ in range(6)]
    index = ReferenceIndex()
    submitted = finished = cancelled = exact_checks = preempted = hits = 0
    step_no = 0
    while submitted < 10_000 or sched.has_work():
        while submitted < 10_000 and len(sched.requests) < 20:
            sched.add(new_sequence(rng, submitted, prefixes))
            submitted += 1
        if rng.random() < 0.05 and sched.requests:  # cancel between steps
            sched.abort(rng.choice(list(sched.requests)))
            cancelled += 1
        cached_before = pool.cached_hashes()
        waiting_ids = {id(s) for s in sched.waiting}
        out = sched.schedule()
        assert out.num_batched_tokens <= BUDGET and len(sched.running) <= MAX_SEQS
        preempted += len(out.preempted)
        if rng.random() < 0.05 and sched.requests:  # cancel while the step is in flight
            sched.abort(rng.choice(list(sched.requests)))
            cancelled += 1
        for f in sched.update(sample(out, rng)):
            check_finish(f, sched.max_model_len)
            finished += 1
        removed = index.apply(pool.drain_events())
        # Brute-force recount of each first admission's prefix hit.
        for s in admissions(out, waiting_ids):
            hashes = s.seq.block_hashes((s.seq.prompt_len - 1) // BS, BS)
            upper = leading_hits(hashes, cached_before) * BS
            lower = leading_hits(hashes, cached_before - removed) * BS
            assert lower <= s.seq.num_cached_tokens <= upper
            assert s.num_cached_tokens == s.seq.num_cached_tokens == s.start
            exact_checks += lower == upper
            hits += lower > 0
        assert set(index.blocks) == pool.cached_hashes()
        step_no += 1
        if step_no % 500 == 0:
            pool.check_invariants()
            snap = pool.snapshot()
            assert snap.last_event_id == index.last_event_id
            assert {b.block_hash: b.parent_hash for b in snap.blocks} == index.blocks
    assert finished + cancelled >= 10_000 and finished > 8000
    assert exact_checks > 5000 and hits > 3000 and preempted > 0
    assert pool.num_active_blocks == 0 and pool.num_free_blocks == pool.num_blocks
    pool.check_invariants()
    snap = pool.snapshot()
    assert {b.block_hash: b.parent_hash for b in snap.blocks} == index.blocks
    seen: set[int] = set()
    for block in snap.blocks:  # parents before children
        assert block.parent_hash is None or block.parent_hash not in index.blocks or (
            block.parent_hash in seen
        )
        seen.add(block.block_hash)
