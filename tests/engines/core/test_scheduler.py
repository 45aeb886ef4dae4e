"""Scheduler: budgets, chunking, preemption, stop rules, rejection, aborts mid-step."""

from __future__ import annotations

import pytest

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import (
    FinishedSeq,
    RequestRejected,
    Scheduler,
    SchedulerConfig,
)
from kvflow.engines.core.sequence import SeqStatus, Sequence, StopRule
from kvflow.llm.protocol import FINISH_LENGTH, FINISH_STOP, PreprocessedRequest, StopConditions

BS = 4


def make(num_blocks: int = 64, **kw: object) -> Scheduler:
    config = SchedulerConfig(block_size=BS, **kw)  # type: ignore[arg-type]
    return Scheduler(config, BlockPool(num_blocks, BS))


def echo_token(seq: Sequence) -> int:
    """Deterministic output: the prompt again, cyclically."""
    return seq.token_ids[seq.num_output_tokens % seq.prompt_len]


def step(sched: Scheduler) -> list[FinishedSeq]:
    out = sched.schedule()
    sampled = {s.seq.request_id: [echo_token(s.seq)] for s in out.scheduled if s.samples}
    return sched.update(sampled)


def run_all(sched: Scheduler, max_steps: int = 10_000) -> dict[str, FinishedSeq]:
    done: dict[str, FinishedSeq] = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return done
        done.update((f.seq.request_id, f) for f in step(sched))
    raise AssertionError("scheduler made no progress")


def seq(rid: str, n: int, max_tokens: int = 4, **stop: object) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), StopRule(max_tokens=max_tokens, **stop))  # type: ignore[arg-type]


def test_chunked_prefill_respects_budget() -> None:
    sched = make(max_num_batched_tokens=32, max_num_seqs=4)
    sched.add(seq("a", 100))
    chunks = []
    while sched.has_work():
        out = sched.schedule()
        assert out.num_batched_tokens <= 32
        chunks.append([s.num_new_tokens for s in out.scheduled])
        sched.update({s.seq.request_id: [7] for s in out.scheduled if s.samples})
    assert chunks[:4] == [[32], [32], [32], [4]] and chunks[4:] == [[1]] * 3


def test_decodes_go_first_and_the_prefill_is_chunked_behind_them() -> None:
    sched = make(max_num_batched_tokens=16, max_num_seqs=4)
    sched.add(seq("short", 3, max_tokens=10))
    step(sched)  # short prefilled, now decoding
    sched.add(seq("long", 40))
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens, s.is_prefill) for s in out.scheduled] == [
        ("short", 1, False),
        ("long", 15, True),
    ]
    assert not out.scheduled[1].samples  # a partial chunk samples nothing


def test_max_num_seqs_respected() -> None:
    sched = make(max_num_seqs=3, max_num_batched_tokens=64)
    for i in range(10):
        sched.add(seq(f"r{i}", 5))
    peak = 0
    while sched.has_work():
        step(sched)
        peak = max(peak, len(sched.running))
        assert len(sched.running) <= 3
    assert peak == 3


def test_non_chunked_oversize_prefill_runs_alone() -> None:
    sched = make(max_num_batched_tokens=8, max_num_seqs=2, enable_chunked_prefill=False)
    sched.add(seq("a", 3))
    sched.add(seq("big", 20))
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    sched.update({"a": [1]})
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1)]
    sched.update({"a": [1]})
    run_all(sched)


def test_preemption_resumes_with_full_output() -> None:
    prompts = {f"r{i}": 10 + 3 * i for i in range(6)}
    reference = make(num_blocks=512, max_num_seqs=8)
    tight = make(num_blocks=24, max_num_seqs=8)
    for sched in (reference, tight):
        for rid, n in prompts.items():
            sched.add(seq(rid, n, max_tokens=30))
    want = run_all(reference)
    got = run_all(tight)
    assert sum(f.seq.num_preemptions for f in got.values()) > 0
    assert {rid: f.seq.token_ids for rid, f in got.items()} == {
        rid: f.seq.token_ids for rid, f in want.items()
    }
    assert all(f.reason == FINISH_LENGTH and f.seq.num_output_tokens == 30 for f in got.values())
    assert tight.pool.num_active_blocks == 0
    tight.pool.check_invariants()


def test_preempted_sequence_rematches_its_prefix() -> None:
    sched = make(num_blocks=12, max_num_seqs=2, max_num_batched_tokens=64)
    sched.add(seq("a", 16, max_tokens=24))
    sched.add(Sequence("b", [*range(1, 13), 90, 91, 92, 93], StopRule(max_tokens=24)))
    readmission_hits = []
    while sched.has_work():
        out = sched.schedule()
        readmission_hits += [
            s.num_cached_tokens for s in out.scheduled if s.seq.num_preemptions and s.is_prefill
        ]
        sched.update({s.seq.request_id: [echo_token(s.seq)] for s in out.scheduled if s.samples})
    assert readmission_hits and readmission_hits[0] >= 12  # its own blocks were still cached
    assert sched.pool.num_active_blocks == 0


def test_prefix_hit_counts_as_computed_and_never_the_last_token() -> None:
    sched = make()
    sched.add(seq("a", 12, max_tokens=1))
    run_all(sched)
    sched.add(seq("b", 12, max_tokens=1))  # identical prompt, fully cached
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.num_cached_tokens, s.start, s.num_new_tokens) == (8, 8, 4)
    sched.update({"b": [1]})
    sched.add(seq("c", 14, max_tokens=1))
    (s,) = sched.schedule().scheduled
    assert (s.num_cached_tokens, s.num_new_tokens) == (12, 2)


def test_stop_rules() -> None:
    sched = make(max_num_seqs=8)
    # echo output of prompt 1..n: token 3 is the third output.
    sched.add(seq("stop", 6, max_tokens=10, stop_token_ids=frozenset({3})))
    sched.add(seq("eos", 6, max_tokens=10, eos_token_ids=frozenset({2})))
    sched.add(seq("ignore", 6, max_tokens=5, eos_token_ids=frozenset({2}), ignore_eos=True))
    sched.add(seq("min", 6, max_tokens=10, eos_token_ids=frozenset({2}), min_tokens=3))
    sched.add(seq("min_then_stop", 6, max_tokens=10, stop_token_ids=frozenset({1, 5}), min_tokens=2))
    done = run_all(sched)
    outputs = {rid: (f.seq.output_token_ids, f.reason) for rid, f in done.items()}
    assert outputs == {
        "stop": ([1, 2, 3], FINISH_STOP),
        "eos": ([1, 2], FINISH_STOP),
        "ignore": ([1, 2, 3, 4, 5], FINISH_LENGTH),
        "min": ([1, 2, 3, 4, 5, 6, 1, 2], FINISH_STOP),
        "min_then_stop": ([1, 2, 3, 4, 5], FINISH_STOP),
    }


def test_context_length_finishes_with_length() -> None:
    sched = make(max_model_len=10)
    sched.add(seq("a", 7, max_tokens=None))  # type: ignore[arg-type]
    done = run_all(sched)
    assert done["a"].reason == FINISH_LENGTH and done["a"].seq.num_tokens == 10


def test_pool_capacity_bounds_the_context() -> None:
    sched = make(num_blocks=3)  # 12 tokens at most
    with pytest.raises(RequestRejected, match="context holds 12"):
        sched.add(seq("big", 12))
    sched.add(seq("a", 4, max_tokens=100))
    done = run_all(sched)
    assert done["a"].reason == FINISH_LENGTH and done["a"].seq.num_tokens == 12


def test_rejections_say_what_to_do() -> None:
    sched = make()
    sched.add(seq("a", 3))
    with pytest.raises(RequestRejected, match="unique id"):
        sched.add(seq("a", 3))
    with pytest.raises(RequestRejected, match="empty"):
        sched.add(Sequence("e", []))
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32)


def test_abort_mid_step_frees_at_once_and_update_skips_it() -> None:
    sched = make()
    sched.add(seq("a", 10))
    sched.add(seq("b", 10))
    out = sched.schedule()
    used = sched.pool.num_active_blocks
    aborted = sched.abort("a")
    assert aborted is not None and aborted.status is SeqStatus.FINISHED
    assert sched.pool.num_active_blocks == used - 3
    sampled = {s.seq.request_id: [1] for s in out.scheduled if s.samples}
    assert sched.update(sampled) == []
    assert [s.request_id for s in sched.running] == ["b"]
    assert sched.abort("a") is None
    sched.abort("b")
    assert sched.pool.num_active_blocks == 0 and not sched.has_work()


def test_from_request_resolves_stop_conditions() -> None:
    request = PreprocessedRequest(
        "r",
        [5, 6, 7],
        stop=StopConditions(max_tokens=9, min_tokens=2, stop_token_ids=[4], ignore_eos=True),
        eos_token_ids=[2],
    )
    s = Sequence.from_request(request, seed=11)
    assert s.stop == StopRule(9, 2, frozenset({4}), frozenset({2}), True)
    assert (s.prompt_len, s.seed, s.token_ids) == (3, 11, [5, 6, 7])


def test_load_metrics() -> None:
    sched = make(max_num_batched_tokens=16, max_num_seqs=2)
    sched.add(seq("a", 40))
    sched.add(seq("b", 5))
    sched.schedule()
    m = sched.load_metrics()
    assert (m.num_running, m.num_waiting, m.prefill_tokens_inflight) == (1, 1, 40 + 5)
    assert m.active_blocks == 4 and m.total_blocks == 64


def test_load_metrics_count_a_waiting_prompt_net_of_its_cached_prefix() -> None:
    sched = make(max_num_seqs=1)
    sched.add(seq("a", 12, max_tokens=1))
    run_all(sched)  # a's three full blocks stay cached
    sched.add(seq("b", 14, max_tokens=4))
    sched.add(seq("c", 14, max_tokens=4))
    sched.schedule()  # b is admitted (its 12 cached tokens counted as computed), c waits
    m = sched.load_metrics()
    # c would recompute only its 2 uncached tokens; b has 2 left to compute (> 1: prefill)
    assert (m.num_running, m.num_waiting, m.prefill_tokens_inflight) == (1, 1, 2 + 2)
    sched.pool.clear()  # evicted: c's whole prompt is work again
    assert sched.load_metrics().prefill_tokens_inflight == 14 + 2


def test_load_metrics_estimate_the_queue_past_its_head(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvflow.engines.core.load_signal as load_signal

    monkeypatch.setattr(load_signal, "LOAD_EXACT_WAITING", 1)
    sched = make(max_num_seqs=1)
    sched.add(seq("a", 12, max_tokens=1))
    run_all(sched)  # 12 tokens cached
    sched.add(seq("b", 14, max_tokens=4))  # head: 2 uncached tokens, looked up
    sched.add(seq("c", 14, max_tokens=4))  # past the head: 14 x (2 / 14) = 2, estimated
    sched.add(seq("d", 20, max_tokens=4))  # 20 x (2 / 14) = 2.9 -> 3 (its true 8 is not looked up)
    assert sched.load_metrics().prefill_tokens_inflight == 2 + round(34 * 2 / 14)
