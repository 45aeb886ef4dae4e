"""Simulated replay: a trace against mocker-like workers on a virtual clock, much faster than real time.

Each worker is the real engine core (Scheduler + BlockPool) timed by the mocker's
TimingModel, as `kvflow worker --engine mocker` runs it, but stepped by a discrete
event loop instead of asyncio sleeps, so hours of traffic take minutes. Requests go
to the ready worker with the fewest requests (least-loaded). With a router config
that sets a busy threshold (`router=KvRouterConfig(max_prefill_tokens=...)`), routing
follows the router's hold: its own booking of each request's load (`ActiveLoad`:
prompt tokens until the first token, blocks until the end), its busy test, and its
FCFS `HoldQueue`, so while every worker is busy requests wait at the router and go to
whichever worker frees first or joins, in arrival order. A controller (the
planner) is called every interval with what happened in it and may set a new
worker count; new workers serve after `startup_s`, removed ones drain first.
Aggregated workers only. `advance(until)` runs part of the trace and `fork()` copies
the whole state, so a search (the benchmark's oracle) can try several futures.
"""

from __future__ import annotations

import bisect
import copy
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import RequestRejected, Scheduler, SchedulerConfig, SchedulerOutput
from kvflow.engines.core.sequence import Sequence
from kvflow.engines.mocker.timing import TimingModel
from kvflow.frontend.metrics import TOKEN_BUCKETS
from kvflow.llm.protocol import PreprocessedRequest, StopConditions
from kvflow.planner.model import Load, cv2
from kvflow.planner.observe import Observation
from kvflow.replay.report import RequestResult, percentile
from kvflow.replay.trace import TraceRequest, prompt_tokens
from kvflow.router.admission import HoldQueue, Waiter
from kvflow.router.config import KvRouterConfig
from kvflow.router.errors import RouterOverloadedError
from kvflow.router.load import ActiveLoad

TOKEN = 7  # every simulated output token; EOS is ignored


@dataclass(frozen=True)
class SimEngine:
    num_gpu_blocks: int = 16384
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    startup_s: float = 30.0  # from asking for a worker to its first request


@dataclass
class _Record:
    req: TraceRequest
    first_s: float | None = None
    last_s: float = 0.0
    tokens: int = 0
    cached: int = 0


class _Worker:
    def __init__(self, wid: int, engine: SimEngine, now: float) -> None:
        self.wid = wid
        pool = BlockPool(engine.num_gpu_blocks, engine.block_size, worker_id=wid)
        config = SchedulerConfig(engine.max_num_seqs, engine.max_num_batched_tokens, engine.block_size)
        self.scheduler = Scheduler(config, pool)
        self.started_s, self.ready_s = now, now + engine.startup_s
        self.stopped_s: float | None = None
        self.draining = False
        self.stepping = False

    def load(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)


Controller = Callable[[float, Observation], int | None]


@dataclass
class SimResult:
    results: list[RequestResult]
    worker_seconds: float
    end_s: float
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (time, workers held)


class Simulation:
    def __init__(self, trace: list[TraceRequest], *, workers: int, timing: TimingModel | None = None,
                 engine: SimEngine = SimEngine(), interval_s: float = 30.0,
                 controller: Controller | None = None, router: KvRouterConfig | None = None) -> None:
        self.trace, self.engine = trace, engine
        # The router's hold (None: route every request on arrival, as before).
        self.router = router if router is not None and router.has_busy_threshold else None
        self._load = ActiveLoad()
        self.hold: HoldQueue | None = None
        if self.router is not None:
            self.hold = HoldQueue(self.router.max_queue, self.router.queue_timeout_s,
                                  self.router.retry_after_s)
        self.timing = timing or TimingModel()
        self.interval_s, self.controller = interval_s, controller
        self.now = 0.0
        self._events: list[tuple[float, int, str, object]] = []
        self._order = 0  # event tie-break: first scheduled, first handled
        self._next_wid = 0
        self._started = False
        self.workers: list[_Worker] = []
        self._queue: list[Sequence] = []  # arrived while no worker was ready
        self._records: dict[str, _Record] = {}
        self.results: list[RequestResult] = []
        self._window: list[RequestResult] = []
        self._arrivals: list[TraceRequest] = []
        self._cached_window = 0  # cached and prompt tokens of the requests that finished
        self._prompt_window = 0  # successfully this interval, as the frontend counts them
        self._uncached_window = [0] * (len(TOKEN_BUCKETS) + 1)  # their uncached tokens, by bucket
        self.timeline: list[tuple[float, int]] = []
        for _ in range(workers):
            self._add_worker(ready_now=True)

    # -- event loop -----------------------------------------------------------------
    def _at(self, t: float, kind: str, data: object = None) -> None:
        self._order += 1
        heapq.heappush(self._events, (t, self._order, kind, data))

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        for i, req in enumerate(self.trace):
            self._at(req.arrival_s, "arrive", (i, req))
        if self.controller is not None:
            self._at(self.interval_s, "plan")

    def advance(self, until: float = float("inf")) -> None:
        """Handle every event up to `until` (virtual seconds); the clock then reads `until`."""
        self._start()
        handlers = {"arrive": self._arrive, "step": self._step_done, "ready": self._ready,
                    "plan": self._plan, "hold_timeout": self._hold_timeout}
        while self._events and self._events[0][0] <= until:
            at, _, kind, data = heapq.heappop(self._events)
            if kind == "hold_timeout" and not self._still_held(data):
                continue  # its turn came: a cancelled timer does not move the clock
            self.now = at
            handlers[kind](data)
        if until != float("inf"):
            self.now = max(self.now, until)

    @property
    def done(self) -> bool:
        return self._started and not self._events

    def fork(self) -> Simulation:
        """An independent copy of the whole state (the trace and timing model are shared)."""
        memo: dict[int, object] = {id(self.trace): self.trace, id(self.timing): self.timing,
                                   id(self.controller): self.controller}
        memo.update((id(r), r) for r in self.trace)
        return copy.deepcopy(self, memo)

    def result(self) -> SimResult:
        end = self.now
        held = sum((w.stopped_s if w.stopped_s is not None else end) - w.started_s for w in self.workers)
        return SimResult(self.results, held, end, self.timeline)

    def run(self) -> SimResult:
        self.advance()
        return self.result()

    # -- workers --------------------------------------------------------------------
    def _add_worker(self, ready_now: bool = False) -> None:
        w = _Worker(self._next_wid, self.engine, self.now)
        self._next_wid += 1
        if ready_now:
            w.ready_s = self.now
        else:
            self._at(w.ready_s, "ready", w)
        self.workers.append(w)
        self._mark()

    @property
    def active_workers(self) -> int:
        """Workers serving or starting, not draining: what the controller last asked for."""
        return len(self._active())

    def _active(self) -> list[_Worker]:
        return [w for w in self.workers if w.stopped_s is None and not w.draining]

    def _mark(self) -> None:
        self.timeline.append((self.now, sum(1 for w in self.workers if w.stopped_s is None)))

    def set_workers(self, n: int) -> None:
        active = self._active()
        for w in [w for w in self.workers if w.draining and w.stopped_s is None][: max(0, n - len(active))]:
            w.draining = False  # cheaper than starting a new one
            active.append(w)
        for _ in range(n - len(active)):
            self._add_worker()
        surplus = sorted(active, key=lambda w: (self.now < w.ready_s, -w.load()), reverse=True)
        for w in surplus[: max(0, len(active) - n)]:
            w.draining = True
            self._maybe_stop(w)

    def _maybe_stop(self, w: _Worker) -> None:
        if w.draining and not w.stepping and not w.scheduler.has_work():
            w.stopped_s = self.now
            self._mark()

    def _ready(self, w: _Worker) -> None:
        if self.hold is not None:
            self.hold.pump()  # a worker joined: the head of the hold may go to it
            self._kick(w)
            return
        queued, self._queue = self._queue, []
        for seq in queued:
            self._dispatch(seq)
        self._kick(w)

    # -- requests -------------------------------------------------------------------
    def _arrive(self, data: object) -> None:
        i, req = data  # type: ignore[misc]
        rid = f"r{i}"
        preq = PreprocessedRequest(rid, prompt_tokens(req, i),
                                   stop=StopConditions(max_tokens=req.output_length, ignore_eos=True))
        self._records[rid] = _Record(req)
        self._arrivals.append(req)
        seq = Sequence.from_request(preq)
        if self.hold is None:
            self._dispatch(seq)
        else:
            self._route(seq)

    # -- the router's hold (only with a busy threshold) -------------------------------
    def _route(self, seq: Sequence) -> None:
        hold = self.hold
        assert hold is not None
        if hold.try_admit(self._has_room):
            self._release(seq)
            return
        waiter = Waiter(self._has_room, partial(self._release, seq), partial(self._reject, seq))
        try:
            hold.hold(waiter)
        except RouterOverloadedError as exc:
            self._finish(seq.request_id, str(exc))
            return
        if not waiter.admitted:
            self._at(self.now + hold.timeout_s, "hold_timeout", waiter)

    def _eligible(self) -> list[_Worker]:
        cfg = self.router
        assert cfg is not None
        return [w for w in self._active()
                if w.ready_s <= self.now and not cfg.is_busy(self._load.load(w.wid))]

    def _has_room(self) -> bool:
        return bool(self._eligible())

    def _release(self, seq: Sequence) -> None:
        """Its turn: route to the least-loaded worker under the thresholds, book its load."""
        assert self.hold is not None
        try:
            w = min(self._eligible(), key=lambda w: (w.load(), w.wid))
            try:
                w.scheduler.add(seq)
            except RequestRejected as exc:
                self._finish(seq.request_id, str(exc))
                return
            n = seq.prompt_len
            self._load.add(seq.request_id, w.wid, n, -(-n // self.engine.block_size))
            self._kick(w)
        finally:
            self.hold.done()

    def _reject(self, seq: Sequence, error: RouterOverloadedError) -> None:
        self._finish(seq.request_id, str(error))

    def _still_held(self, data: object) -> bool:
        return self.hold is not None and isinstance(data, Waiter) and self.hold.holds(data)

    def _hold_timeout(self, data: object) -> None:
        assert self.hold is not None and isinstance(data, Waiter)
        self.hold.time_out(data)

    def held(self) -> int:
        """Requests waiting at the router for a worker under the busy thresholds."""
        return self.hold.waiting() if self.hold is not None else len(self._queue)

    def _dispatch(self, seq: Sequence) -> None:
        ready = [w for w in self._active() if w.ready_s <= self.now]
        if not ready:
            self._queue.append(seq)
            return
        w = min(ready, key=lambda w: (w.load(), w.wid))
        try:
            w.scheduler.add(seq)
        except RequestRejected as exc:
            self._finish(seq.request_id, str(exc))
            return
        self._kick(w)

    def _kick(self, w: _Worker) -> None:
        if w.stepping or w.stopped_s is not None or not w.scheduler.has_work():
            return
        out = w.scheduler.schedule()
        dt = self.timing.step_time(out) or self.timing.params.step_overhead_s
        w.stepping = True
        self._at(self.now + dt, "step", (w, out))

    def _step_done(self, data: object) -> None:
        w, out = data  # type: ignore[misc]
        sched: Scheduler = w.scheduler
        out_: SchedulerOutput = out
        sampled = {s.seq.request_id: [TOKEN] for s in out_.scheduled
                   if s.samples and sched.requests.get(s.seq.request_id) is s.seq}
        for rid in sampled:
            rec = self._records[rid]
            if rec.first_s is None:
                rec.first_s = self.now
                rec.cached = max(sched.requests[rid].num_cached_tokens, 0)
                self._load.mark_prefill_done(rid)
            rec.tokens += 1
            rec.last_s = self.now
        for f in sched.update(sampled):
            self._finish(f.seq.request_id)
        sched.pool.drain_events()  # nobody subscribes here; keep the pool's event list short
        w.stepping = False
        self._kick(w)
        self._maybe_stop(w)
        if self.hold is not None and sampled:
            self.hold.pump()  # first tokens and finished requests freed load

    def _finish(self, rid: str, error: str = "") -> None:
        rec = self._records.pop(rid)
        self._load.free(rid)
        first = rec.first_s if rec.first_s is not None else float("inf")
        itl = (rec.last_s - first) / (rec.tokens - 1) if rec.tokens > 1 else 0.0
        result = RequestResult(rec.req.arrival_s, first - rec.req.arrival_s, itl, rec.tokens, error)
        self.results.append(result)
        self._window.append(result)
        if not error:
            self._cached_window += rec.cached
            self._prompt_window += rec.req.input_length
            self._uncached_window[bisect.bisect_left(TOKEN_BUCKETS, rec.req.input_length - rec.cached)] += 1

    # -- the controller ---------------------------------------------------------------
    def _plan(self, _: object) -> None:
        obs = self._observation()
        target = self.controller(self.now, obs) if self.controller else None
        if target is not None and target != len(self._active()):
            self.set_workers(target)
        if self._events or self._records:
            self._at(self.now + self.interval_s, "plan")

    def _observation(self) -> Observation:
        arrivals, self._arrivals = self._arrivals, []
        done, self._window = self._window, []
        cached, self._cached_window = self._cached_window, 0
        prompt, self._prompt_window = self._prompt_window, 0
        uncached, self._uncached_window = self._uncached_window, [0] * (len(TOKEN_BUCKETS) + 1)
        finished = sum(uncached)
        shares = tuple(zip((*TOKEN_BUCKETS, float("inf")), (c / finished for c in uncached), strict=True)
                       ) if finished else ()
        n = len(arrivals)
        isl = sum(r.input_length for r in arrivals) / n if n else 0.0
        osl = sum(r.output_length for r in arrivals) / n if n else 0.0
        square = sum(r.input_length ** 2 for r in arrivals) / n if n else 0.0
        load = Load(n / self.interval_s, isl, osl, min(cached / prompt, 1.0) if prompt else 0.0,
                    cv2(square, isl), shares)
        ttft = [r.ttft_s for r in done]
        itl = [r.itl_s for r in done if r.output_tokens > 1]
        return Observation(self.now, self.interval_s, n, load,
                           percentile(ttft, 90) if ttft else None, percentile(itl, 90) if itl else None,
                           held=self.held(), ttft_bins=tuple((t, t, 1.0) for t in ttft),
                           itl_bins=tuple((t, t, 1.0) for t in itl))
