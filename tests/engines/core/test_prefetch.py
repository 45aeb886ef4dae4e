"""A request whose prefix a local KV tier holds starts loading when it arrives (while a step
runs), not at the next step's admission; it passes no one and gives way when there is no room."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import Scheduler, SchedulerConfig
from kvflow.engines.core.sequence import SeqStatus, Sequence, StopRule
from kvflow.kv.connector import BaseConnector, ExternalMatch, LoadResult

BS = 4


class Tier(BaseConnector):
    """Holds every prompt token but the last of requests named tier-*."""

    def __init__(self, local: bool = True) -> None:
        self.prefetch_on_arrival = local
        self.started: list[str] = []
        self.done: list[LoadResult] = []

    def match_external(self, seq: Sequence, num_local_tokens: int) -> ExternalMatch:  # type: ignore[override]
        if not seq.request_id.startswith("tier"):
            return ExternalMatch()
        n = (seq.num_tokens - 1) // BS * BS - num_local_tokens
        return ExternalMatch(num_tokens=n, num_cached_tokens=n, load_async=True) if n > 0 else ExternalMatch()

    def start_load(self, seq: Sequence, block_ids: Seq[int], num_tokens: int) -> None:  # type: ignore[override]
        self.started.append(seq.request_id)

    def take_finished_loads(self) -> list[LoadResult]:
        done, self.done = self.done, []
        return done

    def has_pending(self) -> bool:
        return bool(self.done)


def seq(name: str, n: int = 13) -> Sequence:
    return Sequence(name, list(range(100, 100 + n)), StopRule(max_tokens=1))


def scheduler(conn: Tier, blocks: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(block_size=BS), BlockPool(blocks, BS), conn)


def test_a_tier_hit_starts_loading_on_arrival_while_a_step_runs() -> None:
    conn = Tier()
    sched = scheduler(conn)
    sched.add(seq("plain", 5))
    step = sched.schedule()  # a step is in flight from here until update()
    hit = seq("tier-1")
    sched.add(hit)
    assert sched.prefetch(hit)
    assert conn.started == ["tier-1"] and hit.status is SeqStatus.LOADING
    assert not sched.waiting and len(hit.block_ids) == 3 and hit.num_cached_tokens == 12
    sched.update({s.seq.request_id: [7] for s in step.scheduled})
    conn.done.append(LoadResult("tier-1", True))
    out = sched.schedule()  # landed: it computes only its last token
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("tier-1", 1)]


def test_no_prefetch_past_a_queue_or_without_a_local_connector_or_a_hit() -> None:
    conn = Tier()
    sched = scheduler(conn)
    first, second = seq("plain", 5), seq("tier-2")
    sched.add(first)
    sched.add(second)
    assert not sched.prefetch(second)  # it would pass `first`
    assert conn.started == [] and list(sched.waiting) == [first, second]

    remote = Tier(local=False)  # e.g. an object store: a network round trip per match
    sched = scheduler(remote)
    hit = seq("tier-3")
    sched.add(hit)
    assert not sched.prefetch(hit) and remote.started == []
    assert sched.schedule().scheduled == [] and remote.started == ["tier-3"]  # at admission, as before

    sched = scheduler(Tier())
    miss = seq("plain-4")
    sched.add(miss)
    assert not sched.prefetch(miss)  # nothing to load: admitted at the next step as usual
    assert miss.block_ids == [] and miss.num_computed_tokens == 0 and list(sched.waiting) == [miss]


def test_prefetch_without_room_leaves_the_request_waiting_untouched() -> None:
    conn = Tier()
    sched = scheduler(conn, blocks=4)
    sched.add(Sequence("plain", list(range(500, 512)), StopRule(max_tokens=1)))  # 3 of 4 blocks
    step = sched.schedule()
    hit = seq("tier-5")
    sched.add(hit)
    assert not sched.prefetch(hit)
    assert conn.started == [] and hit.block_ids == [] and list(sched.waiting) == [hit]
    assert sched.pool.num_free_blocks == 1
    sched.update({s.seq.request_id: [7] for s in step.scheduled})  # `plain` ends: room again
    sched.schedule()  # the hit parks at admission, as any request would
    assert conn.started == ["tier-5"] and hit.status is SeqStatus.LOADING
