"""The KV contract: layout checks, block runs, region I/O, and the scheduler's connector hooks."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import pytest

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import Scheduler, SchedulerConfig
from kvflow.engines.core.sequence import SeqStatus, Sequence, StopRule
from kvflow.kv import (
    BaseConnector,
    BlockRun,
    ExternalMatch,
    KvLayout,
    KvLayoutMismatch,
    LoadResult,
    RegionBlockIO,
    check_compatible,
    pair_runs,
)
from kvflow.kv.blocks import copy_run, read_run_from

BS = 4


def layout(**kw: object) -> KvLayout:
    base = dict(num_layers=2, block_size=BS, num_kv_heads=2, head_dim=3, dtype="float16",
                num_slots=8)
    base.update(kw)
    return KvLayout(**base)  # type: ignore[arg-type]


def test_mismatch_names_both_values() -> None:
    check_compatible(layout(), layout(device="cuda", num_slots=99))  # device, size may differ
    with pytest.raises(KvLayoutMismatch) as err:
        check_compatible(layout(), layout(block_size=8, dtype="bfloat16"), "worker 7f")
    msg = str(err.value)
    assert "block_size: this worker 4 vs peer 8" in msg
    assert "dtype: this worker 'float16' vs peer 'bfloat16'" in msg
    assert "worker 7f" in msg


def test_pair_runs_merges_runs_consecutive_on_both_sides() -> None:
    assert pair_runs([3, 4, 5, 9, 10], [0, 1, 2, 3, 7]) == [
        BlockRun(3, 0, 3), BlockRun(9, 3, 1), BlockRun(10, 7, 1)]
    assert pair_runs([], []) == []


def test_region_io_round_trip_and_direct_copy() -> None:
    lay = layout()
    src_mem = bytearray(range(256)) * (lay.region_bytes // 256 + 1)
    src = RegionBlockIO(lay, memoryview(src_mem))
    dst_lay = layout(num_slots=12)
    dst = RegionBlockIO(dst_lay, memoryview(bytearray(dst_lay.region_bytes)))
    data = src.read_run(2, 3)
    assert len(data) == 3 * lay.block_bytes
    dst.write_run(5, 3, data)
    assert dst.read_run(5, 3) == data
    copy_run(lay, src.region(), dst_lay, dst.region(), BlockRun(6, 0, 2))
    assert dst.read_run(0, 2) == read_run_from(lay, src.region(), 6, 2)
    with pytest.raises(ValueError, match="outside"):
        src.read_run(7, 2)


class FakeLoader(BaseConnector):
    """Supplies every remote-marked prompt token but the last, loaded 'later' by the test."""

    def __init__(self, hold: bool = False) -> None:
        self.started: list[tuple[str, list[int], int]] = []
        self.results: list[LoadResult] = []
        self.released: list[list[int]] = []
        self.held: dict[str, list[int]] = {}
        self.evicted: list[list[int]] = []
        self.hold = hold
        self.failed: set[str] = set()

    def match_external(self, seq: Sequence, num_local_tokens: int) -> ExternalMatch:  # type: ignore[override]
        if seq.request_id in self.failed or not seq.request_id.startswith("remote"):
            return ExternalMatch()
        return ExternalMatch(num_tokens=seq.num_tokens - 1 - num_local_tokens, load_async=True)

    def start_load(self, seq: Sequence, block_ids: Seq[int], num_tokens: int) -> None:  # type: ignore[override]
        self.started.append((seq.request_id, list(block_ids), num_tokens))

    def request_finished(self, seq: Sequence) -> bool:  # type: ignore[override]
        if self.hold:
            self.held[seq.request_id] = list(seq.block_ids)
        return self.hold

    def before_evict(self, block_ids: list[int], seq_hashes: list[int]) -> None:
        assert len(block_ids) == len(seq_hashes)
        self.evicted.append(list(block_ids))

    def take_finished_loads(self) -> list[LoadResult]:
        out, self.results = self.results, []
        return out

    def take_released(self) -> list[list[int]]:
        out, self.released = self.released, []
        return out

    def has_pending(self) -> bool:
        return bool(self.results or self.released)


def make(connector: FakeLoader, num_blocks: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(block_size=BS), BlockPool(num_blocks, BS), connector)


def run(sched: Scheduler, steps: int = 50) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(steps):
        if not sched.has_work():
            break
        step = sched.schedule()
        sampled = {s.seq.request_id: [7] for s in step.scheduled if s.samples}
        for f in sched.update(sampled):
            out[f.seq.request_id] = f.seq.output_token_ids
    return out


def seq(rid: str, n: int = 10, max_tokens: int = 2) -> Sequence:
    return Sequence(rid, list(range(100, 100 + n)), StopRule(max_tokens=max_tokens))


def test_async_load_parks_then_runs_with_tokens_computed() -> None:
    conn = FakeLoader()
    sched = make(conn)
    s = seq("remote-1")
    sched.add(s)
    first = sched.schedule()
    assert first.scheduled == [] and s.status is SeqStatus.LOADING
    rid, blocks, n = conn.started[0]
    assert (rid, n, len(blocks)) == ("remote-1", 9, 3)  # 9 tokens -> blocks 0..2
    sched.update({})
    assert not sched.has_work()  # nothing to do until the load reports
    conn.results.append(LoadResult("remote-1", ok=True))
    assert sched.has_work()
    step = sched.schedule()
    assert [(x.seq.request_id, x.num_new_tokens) for x in step.scheduled] == [("remote-1", 1)]
    sched.update({"remote-1": [7]})
    assert run(sched) == {"remote-1": [7, 7]}
    sched.pool.check_invariants()
    assert sched.pool.num_active_blocks == 0


def test_failed_load_recomputes_and_abort_while_loading_frees_on_report() -> None:
    conn = FakeLoader()
    sched = make(conn)
    sched.add(seq("remote-a"))
    sched.add(seq("remote-b"))
    sched.schedule()
    sched.update({})
    conn.failed.add("remote-a")
    conn.results.append(LoadResult("remote-a", ok=False, reason="peer gone"))
    step = sched.schedule()
    assert [(x.seq.request_id, x.num_new_tokens) for x in step.scheduled] == [("remote-a", 10)]
    sched.update({"remote-a": [7]})
    assert sched.abort("remote-b") is not None
    held = sched.pool.num_active_blocks
    assert held >= 3  # remote-b's blocks stay taken while its load may still write them
    conn.results.append(LoadResult("remote-b", ok=True))
    assert run(sched) == {"remote-a": [7, 7]}
    assert sched.pool.num_active_blocks == 0
    assert sched.loads.num_failed == 1


def test_request_finished_hold_and_evict_hook() -> None:
    conn = FakeLoader(hold=True)
    sched = make(conn, num_blocks=6)
    sched.add(seq("p", n=9, max_tokens=1))
    assert run(sched) == {"p": [7]}
    assert sched.pool.num_active_blocks == 3  # held for a transfer
    conn.released.append(conn.held.pop("p"))
    run(sched)
    assert sched.pool.num_active_blocks == 0
    conn.hold = False
    sched.add(Sequence("q", list(range(500, 521)), StopRule(max_tokens=1)))
    run(sched)
    # cached blocks of "p" were reused for "q": the hook saw them, one call per allocation
    assert conn.evicted and all(conn.evicted)
    sched.pool.check_invariants()
