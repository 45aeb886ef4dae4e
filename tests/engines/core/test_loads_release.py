"""Landed KV loads never deadlock the scheduler: when nothing runs and the queue head does
not fit, a loaded waiting sequence gives its blocks back and recomputes later."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import Scheduler, SchedulerConfig
from kvflow.engines.core.sequence import Sequence, StopRule
from kvflow.kv.connector import BaseConnector, ExternalMatch, LoadResult

BS = 4


class Loader(BaseConnector):
    """Loads every prompt token but the last of requests named remote-*, when told."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def match_external(self, seq: Sequence, num_local_tokens: int) -> ExternalMatch:  # type: ignore[override]
        if not seq.request_id.startswith("remote"):
            return ExternalMatch()
        return ExternalMatch(num_tokens=seq.num_tokens - 1 - num_local_tokens, load_async=True)

    def start_load(self, seq: Sequence, block_ids: Seq[int], num_tokens: int) -> None:  # type: ignore[override]
        self.started.append(seq.request_id)


def test_a_queue_head_blocked_by_landed_loads_gets_their_blocks() -> None:
    conn = Loader()
    sched = Scheduler(SchedulerConfig(block_size=BS), BlockPool(8, BS), conn)
    remotes = [Sequence(f"remote-{i}", list(range(10 * i, 10 * i + 13)), StopRule(max_tokens=1))
               for i in (1, 2)]
    for s in remotes:
        sched.add(s)
    assert sched.schedule().scheduled == []  # both park: 6 of 8 blocks
    sched.update({})
    assert sched.pool.num_free_blocks == 2
    landed = [LoadResult(s.request_id, True) for s in remotes]
    sched.connector.take_finished_loads = lambda: landed  # type: ignore[method-assign]
    sched.connector.has_pending = lambda: bool(landed)  # type: ignore[method-assign]
    waiting = sched.loads.poll()
    landed.clear()
    big = Sequence("big", list(range(200, 212)), StopRule(max_tokens=1))  # 3 blocks, 2 free
    sched.add(big)
    sched.waiting.clear()
    sched.waiting.extend([big, *waiting])  # a preempted request went back to the front
    step = sched.schedule()
    assert [s.seq.request_id for s in step.scheduled][0] == "big"
    assert remotes[1].block_ids == [] and remotes[1].num_computed_tokens == 0  # it recomputes
    finished = {f.seq.request_id for f in sched.update({s.seq.request_id: [7] for s in step.scheduled})}
    for _ in range(20):
        if not sched.has_work():
            break
        out = sched.schedule()
        sampled = {s.seq.request_id: [7] for s in out.scheduled if s.samples}
        finished |= {f.seq.request_id for f in sched.update(sampled)}
    assert finished == {"big", "remote-1"}
    assert remotes[1].request_id in sched.loads._loading  # asked its connector again
    assert conn.started.count("remote-2") == 2
    sched.pool.check_invariants()
