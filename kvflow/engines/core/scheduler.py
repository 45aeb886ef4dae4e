"""The engine-agnostic scheduler: who computes how many tokens in the next step.

One primitive (see `sequence.py`): each step gives some sequences `num_new_tokens` to
compute, and a sequence samples a token when its step reaches `num_tokens`. Any
engine's loop reads aloud as:

    out = scheduler.schedule()        # pick tokens, reserve KV blocks
    sampled = execute(out)            # run (or simulate) the model: {request_id: [tokens]}
    finished = scheduler.update(sampled)

Policy (vLLM v1 style): running sequences first (decodes, then the one partially
prefilled sequence, which is always last in `running`), then FCFS admissions from
`waiting` within the token budget, chunking the last prefill. A new admission first
takes its longest cached prefix from the block pool, then whatever a `KvConnector`
(kvflow.kv.connector) supplies (host tier, remote prefill): all just computed tokens;
tokens loaded in the background park the request (loads.py) until they arrive. When
blocks run out the most recently admitted running sequence is preempted by recompute.

Async output (opt-in, `SchedulerConfig(async_output=True)`), for an engine whose device
feeds one step's sampled tokens into the next: step k+1 is planned (at most one step in
flight) before step k's tokens reach the host. `schedule()` counts the KV as computed at
once and each sampled token as a placeholder (sequence.py); `update()` reconciles the
oldest step: placeholders become tokens, then blocks commit and stop rules run as usual.
A sequence ending there had one more step planned; its token is dropped (its KV lands in
freed blocks before any later step, on the same device stream, reuses them). A sequence
whose pending token surely ends it by length gets no further step.

Ownership: the scheduler owns every block it takes from the pool and frees it on
finish (unless the connector keeps it), abort or preemption. `abort` frees at once even
mid-step: freed blocks are not handed out again before the next `schedule()`, after
`update()`, so an executor may finish writing them. Not thread-safe: an engine stepping
on its own thread holds one lock around `schedule`, `update`, `add` and `abort`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.load_signal import load_metrics
from kvflow.engines.core.loads import PARKED, KvLoads, Parked
from kvflow.engines.core.sequence import SeqStatus, Sequence
from kvflow.kv.connector import NO_EXTERNAL, ExternalMatch, KvConnector
from kvflow.llm.kv_events import LoadMetrics
from kvflow.llm.protocol import FINISH_LENGTH


class RequestRejected(ValueError):
    """A request this engine can never serve; the message says why and what to do."""



@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None  # None: limited only by the block pool
    async_output: bool = False  # plan a step before the last one's tokens are known

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.block_size) < 1:
            raise ValueError(f"scheduler limits must be positive: {self}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode"
            )


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step."""

    seq: Sequence
    num_new_tokens: int  # tokens to compute now
    start: int  # tokens with KV before this step: the context the new tokens attend to
    is_prefill: bool
    samples: bool  # the step reaches num_tokens, so the executor samples a token
    num_cached_tokens: int = 0  # prefix-cache hit taken at admission in this step
    external: ExternalMatch = NO_EXTERNAL


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    num_batched_tokens: int = 0


@dataclass(frozen=True, slots=True)
class FinishedSeq:
    seq: Sequence
    reason: str  # a kvflow.llm.protocol FINISH_* value


class Scheduler:
    """Waiting queue (FCFS), running list and request table over one BlockPool."""

    def __init__(
        self, config: SchedulerConfig, pool: BlockPool, connector: KvConnector | None = None
    ) -> None:
        assert pool.block_size == config.block_size, "pool and scheduler block sizes differ"
        self.config = config
        self.pool = pool
        self.connector = connector
        self.loads = KvLoads(pool, connector)
        if connector is not None:
            pool.evict_hook = connector.before_evict
        pool_tokens = pool.num_blocks * pool.block_size
        self.max_model_len = min(config.max_model_len or pool_tokens, pool_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self._inflight: deque[SchedulerOutput] = deque()
        self._max_inflight = 2 if config.async_output else 1

    # ---- requests -----------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises RequestRejected if it can never be served."""
        self._check_admissible(seq)
        seq.status = SeqStatus.WAITING
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def prefetch(self, seq: Sequence) -> bool:
        """Start the connector's asynchronous load for `seq`, just added, now rather than at
        the next `schedule()`, so it overlaps the step in progress (the engine calls this
        between steps or while one runs, under its lock). Only when the connector's match
        is local (`prefetch_on_arrival`), `seq` is the only request waiting (it passes
        no one) and there is room; True if it was parked."""
        connector = self.connector
        if (connector is None or not connector.prefetch_on_arrival
                or len(self.waiting) != 1 or self.waiting[0] is not seq
                or len(self.running) >= self.config.max_num_seqs or seq.num_computed_tokens):
            return False
        cached = self._match_local(seq)
        external = self._match_external(seq)
        if not external.load_async:
            self._undo_admission(seq)  # admitted at the next step, as usual
            return False
        if self._park(seq, cached, external) is not PARKED:
            return False  # no room: _park undid the admission
        self.waiting.popleft()
        return True

    def _check_admissible(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise RequestRejected(
                f"request id {seq.request_id!r} is already in flight on this worker; "
                "give every request a unique id"
            )
        if seq.num_tokens == 0:
            raise RequestRejected("the prompt is empty; send at least one token")
        if seq.num_tokens >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {seq.num_tokens} tokens but this worker's context holds "
                f"{self.max_model_len} (prompt and output together); shorten the prompt or "
                "use a worker with a longer context / more KV blocks"
            )

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request now, freeing its blocks; None if it is not here (any more)."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.LOADING:
            self.loads.abort(seq)  # its blocks are freed once the load reports
            return seq
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._release(seq)
        return seq

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.status = SeqStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.loads.has_pending())

    # ---- schedule -----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        assert len(self._inflight) < self._max_inflight, "schedule() called again before update()"
        out = SchedulerOutput([], [])
        self.waiting.extendleft(reversed(self.loads.poll()))
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        num_running = len(out.scheduled)  # async output: counted as computed already
        if not out.preempted:
            self._schedule_waiting(out, budget)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        if self.config.async_output:
            _count_as_computed(out.scheduled[num_running:])
        self._inflight.append(out)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # The hot loop of large decode batches: locals, and the room-left-in-the-last-block
        # case of `_reserve` inline.
        running, scheduled, bs = self.running, out.scheduled, self.config.block_size
        max_len, async_output = self.max_model_len, self.config.async_output
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            computed = seq.num_computed_tokens
            num_tokens = len(seq.token_ids) + seq.num_placeholders
            limit = seq.stop.max_tokens
            if seq.num_placeholders and (num_tokens >= max_len or (
                    limit is not None and num_tokens - seq.prompt_len >= limit)):
                i += 1  # its pending token finishes it by length: no step after that
                continue
            n = min(num_tokens - computed, budget)
            assert n > 0, "a running sequence with nothing to compute"
            if -(-(computed + n) // bs) > len(seq.block_ids) and not self._reserve(
                    seq, computed + n, out):
                break  # seq itself was preempted: nothing after it is left
            samples = computed + n == num_tokens
            scheduled.append(ScheduledSeq(seq, n, computed, n > 1 or computed < seq.prompt_len,
                                          samples))
            if async_output:  # `_count_as_computed`, inline
                seq.num_computed_tokens = computed + n
                if samples:
                    seq.num_placeholders += 1
            budget -= n
            i += 1
        return budget

    def _reserve(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Blocks for `num_tokens` of `seq`, preempting from the tail; False if seq went."""
        need = -(-num_tokens // self.config.block_size) - len(seq.block_ids)
        if need <= 0:
            return True  # the common decode step: room left in the last block
        while not self.pool.can_allocate(need):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            scheduled = self._try_admit(self.waiting[0], budget, out)
            if scheduled is None:
                if self.running or out.scheduled or not self._release_loaded():
                    break
                continue
            self.waiting.popleft()
            if scheduled is PARKED:
                continue
            self.running.append(scheduled.seq)
            out.scheduled.append(scheduled)
            budget -= scheduled.num_new_tokens

    def _release_loaded(self) -> bool:
        """Nothing runs and the head of the queue does not fit, while sequences behind it
        hold blocks their connector loaded: free the last such one (it recomputes), so a
        full pool of landed loads never deadlocks the engine. False if there is none."""
        for seq in reversed(self.waiting):
            if seq is not self.waiting[0] and seq.block_ids:
                self.pool.free(seq.block_ids)
                seq.reset_for_recompute()
                seq.num_cached_tokens = -1
                seq.cached_by_tier = None
                return True
        return False

    def _try_admit(
        self, seq: Sequence, budget: int, out: SchedulerOutput
    ) -> ScheduledSeq | Parked | None:
        assert not seq.num_placeholders, "admitted before its last step was reconciled"
        loaded = seq.num_computed_tokens > 0  # its KV arrived through a connector load
        cached = 0 if loaded else self._match_local(seq)
        external = NO_EXTERNAL if loaded else self._match_external(seq)
        if external.load_async:
            return self._park(seq, cached, external)
        n = self._admission_chunk(seq.num_tokens - seq.num_computed_tokens, budget, out)
        need = self._blocks_for(seq.num_computed_tokens + n) - len(seq.block_ids)
        if n == 0 or not self.pool.can_allocate(need):
            if not loaded:
                self._undo_admission(seq)
            return None
        seq.block_ids.extend(self.pool.allocate(need))
        seq.status = SeqStatus.RUNNING
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = cached + external.num_cached_tokens
        return _scheduled(seq, n, cached, external)

    def _admission_chunk(self, remaining: int, budget: int, out: SchedulerOutput) -> int:
        if remaining <= budget:
            return remaining
        if self.config.enable_chunked_prefill:
            return budget
        return remaining if not out.scheduled else 0  # an oversize prefill runs alone

    def prefix_hashes(self, seq: Sequence) -> list[int]:
        """Hashes of the blocks a cache hit may cover: never the last token's block (the
        last token must be computed); empty without prefix caching."""
        max_blocks = (seq.num_tokens - 1) // self.config.block_size
        if not self.pool.enable_prefix_caching or max_blocks <= 0:
            return []
        return seq.block_hashes(max_blocks, self.config.block_size)

    def _match_local(self, seq: Sequence) -> int:
        """Take the longest cached prefix (never the last token: it must be computed)."""
        hashes = self.prefix_hashes(seq)
        if not hashes:
            return 0
        blocks = self.pool.match_prefix(hashes)
        seq.block_ids = blocks
        seq.num_committed_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * self.config.block_size
        return seq.num_computed_tokens

    def _match_external(self, seq: Sequence) -> ExternalMatch:
        if self.connector is None:
            return NO_EXTERNAL
        external = self.connector.match_external(seq, seq.num_computed_tokens)
        assert 0 <= external.num_tokens < seq.num_tokens - seq.num_computed_tokens
        if not external.load_async:
            seq.num_computed_tokens += external.num_tokens
        return external

    def _park(self, seq: Sequence, cached: int, external: ExternalMatch) -> Parked | None:
        """Blocks for the tokens a connector loads in the background, then wait for them."""
        need = self._blocks_for(seq.num_computed_tokens + external.num_tokens) - len(seq.block_ids)
        if not self.pool.can_allocate(need):
            self._undo_admission(seq)
            return None
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = cached + external.num_cached_tokens
        self.loads.start(seq, self.pool.allocate(need), external.num_tokens)
        return PARKED

    def _undo_admission(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    # ---- update -------------------------------------------------------------------

    def update(self, sampled: Mapping[str, list[int]]) -> list[FinishedSeq]:
        """Advance computed tokens, commit full blocks, append samples, detect finishes.

        With async output this reconciles the oldest step in flight: its computed tokens
        were counted by `schedule`, and a sequence preempted since still takes its token."""
        assert self._inflight, "update() without a schedule() in flight"
        out = self._inflight.popleft()
        finished: list[FinishedSeq] = []
        async_output = self.config.async_output
        caching, bs = self.pool.enable_prefix_caching, self.config.block_size
        max_len = self.max_model_len
        for s in out.scheduled:
            seq = s.seq
            status = seq.status
            if status is SeqStatus.FINISHED:
                continue  # aborted while the step ran (async: or ended by the step before)
            if status is SeqStatus.RUNNING:
                if not async_output:
                    seq.num_computed_tokens += s.num_new_tokens
                if caching and (min(seq.num_computed_tokens, len(seq.token_ids)) // bs
                                > seq.num_committed_blocks):
                    self._commit_full_blocks(seq)
            if not s.samples:
                continue
            if async_output:
                seq.num_placeholders -= 1
            new = sampled[seq.request_id]
            if len(new) == 1:  # the hot case of large decode batches: `_append` inline
                ids, stop, token = seq.token_ids, seq.stop, new[0]
                ids.append(token)
                n = len(ids)
                limit = stop.max_tokens
                if not (token in stop.stop_token_ids or token in stop.eos_token_ids
                        or n >= max_len or (limit is not None and n - seq.prompt_len >= limit)):
                    continue  # neither a stop token nor a length: finish_reason would be None
                reason = stop.finish_reason(token, n - seq.prompt_len)
                if reason is None and n >= max_len:
                    reason = FINISH_LENGTH
            else:
                reason = self._append(seq, new)
            if reason is not None:
                self._finish(seq, reason, finished)
        if finished:
            self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]
        return finished

    def _finish(self, seq: Sequence, reason: str, finished: list[FinishedSeq]) -> None:
        if seq.status is SeqStatus.WAITING:  # async: preempted after its step was planned
            self.waiting.remove(seq)
        del self.requests[seq.request_id]
        if self.connector is not None and self.connector.request_finished(seq):
            seq.block_ids = []  # the connector holds them now (take_released frees them)
            seq.status = SeqStatus.FINISHED
        else:
            self._release(seq)
        finished.append(FinishedSeq(seq, reason))

    def _commit_full_blocks(self, seq: Sequence) -> None:
        """Commit blocks whose KV is computed (or queued on the device) and tokens are known."""
        if not self.pool.enable_prefix_caching:
            return
        bs = self.config.block_size
        n_full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        for i in range(seq.num_committed_blocks, n_full):
            parent = seq.block_hash(i - 1, bs) if i else seq.parent_hash_seed
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            seq.block_ids[i] = self.pool.commit(
                seq.block_ids[i], seq.block_hash(i, bs), parent, tokens
            )
        seq.num_committed_blocks = max(n_full, seq.num_committed_blocks)

    def _append(self, seq: Sequence, tokens: list[int]) -> str | None:
        ids, stop = seq.token_ids, seq.stop
        for token in tokens:
            ids.append(token)
            reason = stop.finish_reason(token, len(ids) - seq.prompt_len)
            if reason is None and len(ids) >= self.max_model_len:
                reason = FINISH_LENGTH
            if reason is not None:
                return reason
        return None

    # ---- metrics ------------------------------------------------------------------

    def load_metrics(self) -> LoadMetrics:
        """What this worker publishes about its load (kvflow.engines.core.load_signal)."""
        return load_metrics(self)


def _count_as_computed(scheduled: list[ScheduledSeq]) -> None:
    """Async output: the step's KV counts as computed now, each sampled token as a placeholder."""
    for s in scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
        if s.samples:
            s.seq.num_placeholders += 1


def _scheduled(
    seq: Sequence, n: int, cached: int = 0, external: ExternalMatch = NO_EXTERNAL
) -> ScheduledSeq:
    start = seq.num_computed_tokens
    return ScheduledSeq(
        seq=seq,
        num_new_tokens=n,
        start=start,
        is_prefill=n > 1 or start < seq.prompt_len,
        samples=start + n == seq.num_tokens,
        num_cached_tokens=cached,
        external=external,
    )
