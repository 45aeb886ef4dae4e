"""Scheduler with async output: steps planned before the last step's tokens are known.

A fake device keeps each request's true token history (it "samples" with a deterministic
function of the history, so every request has one right output whatever the batching).
Checked: the inputs of every launched step agree with the host's tokens where those are
known, every finished output equals the deterministic chain cut by its stop rule, no
step runs past the context, and no block leaks, under random load, cancellations,
preemptions and steps that must wait for the tokens before launching.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import FinishedSeq, Scheduler, SchedulerConfig, SchedulerOutput
from kvflow.engines.core.sequence import SeqStatus, Sequence, StopRule
from kvflow.llm.protocol import FINISH_LENGTH, FINISH_STOP

BS = 4
VOCAB = 40


def model(tokens: list[int]) -> int:
    """The next token: depends on the whole history, so a wrong input shows in the output."""
    return (7 * tokens[-1] + 3 * sum(tokens[-4:]) + len(tokens)) % VOCAB


def expected(prompt: list[int], rule: StopRule, max_model_len: int) -> tuple[list[int], str]:
    tokens, out = list(prompt), []
    while True:
        token = model(tokens)
        tokens.append(token)
        out.append(token)
        reason = rule.finish_reason(token, len(out))
        if reason is None and len(tokens) >= max_model_len:
            reason = FINISH_LENGTH
        if reason is not None:
            return out, reason


@dataclass
class FakeDevice:
    """Runs steps "on the device": it knows every token it sampled, before the host does."""

    history: dict[str, list[int]] = field(default_factory=dict)

    def launch(self, out: SchedulerOutput, max_model_len: int) -> dict[str, list[int]]:
        sampled: dict[str, list[int]] = {}
        for s in out.scheduled:
            seq = s.seq
            if seq.status is SeqStatus.FINISHED:
                continue  # the engine drops these before launching
            h = self.history.setdefault(seq.request_id, list(seq.token_ids))
            hi = s.start + s.num_new_tokens
            assert hi <= len(h) and hi <= max_model_len
            known = min(hi, len(seq.token_ids))
            assert seq.token_ids[s.start : known] == h[s.start : known]
            assert len(seq.block_ids) * BS >= hi, "KV slots reserved for every computed token"
            if s.samples:
                assert hi == len(h), "samples exactly after the last token"
                h.append(model(h))
                sampled[seq.request_id] = [h[-1]]
        return sampled


def make(num_blocks: int = 64, **kw: object) -> Scheduler:
    config = SchedulerConfig(block_size=BS, async_output=True, **kw)  # type: ignore[arg-type]
    return Scheduler(config, BlockPool(num_blocks, BS))


def check(f: FinishedSeq, max_model_len: int) -> None:
    seq = f.seq
    out, reason = expected(seq.token_ids[: seq.prompt_len], seq.stop, max_model_len)
    assert (seq.output_token_ids, f.reason) == (out, reason)


def test_next_step_is_planned_on_a_placeholder() -> None:
    sched, device = make(), FakeDevice()
    sched.add(Sequence("a", [5, 6, 7], StopRule(max_tokens=3)))
    first = sched.schedule()
    seq = first.scheduled[0].seq
    assert (seq.num_tokens, len(seq.token_ids), seq.num_computed_tokens) == (4, 3, 3)
    pending = device.launch(first, sched.max_model_len)
    second = sched.schedule()  # before the first step's token is known
    assert [(s.start, s.num_new_tokens, s.samples) for s in second.scheduled] == [(3, 1, True)]
    assert seq.num_placeholders == 2
    assert sched.update(pending) == []
    assert seq.token_ids == device.history["a"][:4] and seq.num_placeholders == 1
    plans: list[list[int]] = []
    finished: list[FinishedSeq] = []
    pending = device.launch(second, sched.max_model_len)
    while sched.has_work():
        out = sched.schedule()
        plans.append([s.start for s in out.scheduled])
        following = device.launch(out, sched.max_model_len)
        finished += sched.update(pending)
        pending = following
    assert plans == [[4], []]  # the third token ends it by length: no step is planned after it
    assert [f.reason for f in finished] == [FINISH_LENGTH]
    assert seq.output_token_ids == device.history["a"][3:] and len(seq.output_token_ids) == 3
    assert sched.pool.num_active_blocks == 0


def test_stop_token_found_late_drops_the_extra_step_and_frees_blocks() -> None:
    prompt = [3, 9, 1, 4]
    stop_at = expected(prompt, StopRule(max_tokens=50), 10_000)[0][1]  # the second output token
    sched, device = make(num_blocks=8), FakeDevice()
    sched.add(Sequence("s", list(prompt), StopRule(max_tokens=50,
                                                 stop_token_ids=frozenset({stop_at}))))
    inflight: deque[tuple[SchedulerOutput, dict[str, list[int]]]] = deque()
    finished: list[FinishedSeq] = []
    launched_after_stop = 0
    while sched.has_work() or inflight:
        out = sched.schedule()
        sampled = device.launch(out, sched.max_model_len)
        launched_after_stop += bool(finished and sampled)
        if inflight:
            finished += sched.update(inflight.popleft()[1])
        inflight.append((out, sampled))
        if not sched.has_work():
            while inflight:
                finished += sched.update(inflight.popleft()[1])
    assert [f.reason for f in finished] == [FINISH_STOP]
    assert finished[0].seq.output_token_ids[-1] == stop_at
    assert len(device.history["s"]) == len(prompt) + 3  # one token sampled past the stop, dropped
    assert launched_after_stop == 0
    assert sched.pool.num_active_blocks == 0


def test_preempted_while_its_token_is_pending_keeps_that_token() -> None:
    sched, device = make(num_blocks=5, max_num_seqs=4, max_num_batched_tokens=64), FakeDevice()
    rule = StopRule(max_tokens=12, ignore_eos=True)
    for rid in ("a", "b"):
        sched.add(Sequence(rid, list(range(1, 8)), rule))  # 2 blocks each, then growth
    inflight: deque[dict[str, list[int]]] = deque()
    finished: list[FinishedSeq] = []
    preempted_with_pending = 0
    while sched.has_work() or inflight:
        out = sched.schedule()
        preempted_with_pending += sum(s.num_placeholders > 0 for s in out.preempted)
        sampled = device.launch(out, sched.max_model_len)
        if inflight:
            finished += sched.update(inflight.popleft())
        inflight.append(sampled)
        if not sched.has_work():
            while inflight:
                finished += sched.update(inflight.popleft())
    assert preempted_with_pending > 0
    assert sorted(f.seq.request_id for f in finished) == ["a", "b"]
    for f in finished:
        check(f, sched.max_model_len)
    assert sched.pool.num_active_blocks == 0


def test_random_load_with_cancellations_and_drains() -> None:
    rng = random.Random(7)
    sched, device = make(num_blocks=40, max_num_seqs=6, max_num_batched_tokens=24,
                         max_model_len=60), FakeDevice()
    inflight: deque[dict[str, list[int]]] = deque()
    submitted = done = preempted = 0

    def reconcile() -> None:
        nonlocal done
        for f in sched.update(inflight.popleft()):
            check(f, sched.max_model_len)
            done += 1

    while submitted < 600 or sched.has_work() or inflight:
        while submitted < 600 and len(sched.requests) < 10:
            prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 30))]
            rule = StopRule(max_tokens=rng.randrange(1, 20), min_tokens=rng.choice([0, 2]),
                            eos_token_ids=frozenset({0}), ignore_eos=rng.random() < 0.3)
            sched.add(Sequence(f"r{submitted}", prompt, rule))
            submitted += 1
        if not sched.has_work():
            while inflight:
                reconcile()
            continue
        if rng.random() < 0.03:
            sched.abort(rng.choice(list(sched.requests)))
        out = sched.schedule()
        preempted += len(out.preempted)
        assert out.num_batched_tokens <= 24 and len(sched.running) <= 6
        if inflight and rng.random() < 0.2:  # e.g. penalties: this step needs the real tokens
            reconcile()
        if rng.random() < 0.03 and sched.requests:  # cancelled while the step is in flight
            sched.abort(rng.choice(list(sched.requests)))
        sampled = device.launch(out, sched.max_model_len)
        if inflight:
            reconcile()
        inflight.append(sampled)
        if rng.random() < 0.02:
            sched.pool.check_invariants()
    assert done > 450 and preempted > 0
    assert sched.pool.num_active_blocks == 0 and not sched.requests
    sched.pool.check_invariants()


def test_sync_mode_is_unchanged_by_the_option() -> None:
    """Same workload through both modes: identical outputs, sync never plans ahead."""
    outputs: dict[bool, dict[str, list[int]]] = {}
    for async_output in (False, True):
        config = SchedulerConfig(block_size=BS, max_num_seqs=4, max_num_batched_tokens=16,
                                 async_output=async_output)
        sched, device = Scheduler(config, BlockPool(32, BS)), FakeDevice()
        for i in range(5):
            sched.add(Sequence(f"q{i}", list(range(2, 9 + 3 * i)), StopRule(max_tokens=6 + i)))
        inflight: deque[dict[str, list[int]]] = deque()
        result: dict[str, list[int]] = {}
        while sched.has_work() or inflight:
            if sched.has_work():
                inflight.append(device.launch(sched.schedule(), sched.max_model_len))
                assert async_output or all(s.num_placeholders == 0 for s in sched.running)
            if not async_output or len(inflight) == 2 or not sched.has_work():
                for f in sched.update(inflight.popleft()):
                    result[f.seq.request_id] = f.seq.output_token_ids
        outputs[async_output] = result
    assert outputs[False] == outputs[True] and len(outputs[True]) == 5
