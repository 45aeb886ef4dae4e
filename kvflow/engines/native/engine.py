"""NativeEngine: real inference in PyTorch on the shared scheduler, with the model on its own thread.

The engine thread runs the loop `schedule -> execute -> update`. The scheduler and block
pool are shared with the event loop (admissions, cancellations, snapshots) under one lock,
which the thread holds only around `schedule`, staging the inputs, and `update`, never
while it waits for the device: a cancellation frees its blocks at once, even mid-step.
Results cross back to the event loop with `call_soon_threadsafe`; KV events and load
metrics are published from there.

With async output (on with CUDA graphs) execute is split: the loop schedules and launches
step k+1, then collects and updates step k while the device runs k+1, so the host's work
hides behind the device's; step k's outputs reach the event loop once step k+2 is launched
(see `step`). A step whose sampling needs the real previous tokens (penalties) waits for
them first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec

from kvflow.engines.base import EngineHooks
from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.outputs import follow_outputs
from kvflow.engines.core.scheduler import (
    FinishedSeq,
    RequestRejected,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from kvflow.engines.core.sequence import SeqStatus, Sequence
from kvflow.engines.native.compile_watch import CompileWatch
from kvflow.engines.native.config import NativeEngineConfig
from kvflow.engines.native.guided import GuidedDecoding
from kvflow.engines.native.handover import Deliveries, Handover, Published
from kvflow.engines.native.pooling import POOLINGS
from kvflow.engines.native.runner import Launched, ModelRunner, StepResult
from kvflow.engines.native.sampler import RequestSampling
from kvflow.engines.native.stream import Delivery, RequestStream
from kvflow.engines.native.tp_ranks import RankGroup, load_runner
from kvflow.engines.native.warmup import warm_serving_path
from kvflow.engines.native.weights import resolve_model_dir
from kvflow.kv.connector import EngineKv, KvConnector, KvShard
from kvflow.kv.tiers.connector import model_identity, tier_connector_factory
from kvflow.llm.kv_events import CacheSnapshot
from kvflow.llm.protocol import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_STOP,
    EngineOutput,
    PreprocessedRequest,
    StopConditions,
)
from kvflow.llm.structured import GrammarError, is_guided
from kvflow.runtime.context import Context
from kvflow.runtime.threads import in_daemon_thread

log = logging.getLogger(__name__)

LOAD_INTERVAL_S = 0.05


@dataclass
class InFlight:
    """A scheduled step not yet updated: what was planned and what the device is doing."""

    out: SchedulerOutput
    launched: Launched | None  # None: nothing ran (nothing fit, or the launch failed)
    started: float = 0.0  # perf_counter at launch


class NativeEngine:
    """The native PyTorch engine, implementing kvflow.engines.base.Engine."""

    def __init__(self, config: NativeEngineConfig, hooks: EngineHooks | None = None) -> None:
        self.config = config
        self.hooks = hooks or EngineHooks()
        self._lock = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._sampling: dict[str, RequestSampling] = {}
        self._num_penalized = 0  # requests whose sampling reads their past tokens (penalties, grammars)
        self._num_special = 0  # requests not greedy-and-plain (see ModelRunner.launch)
        self._handover = Handover(self.hooks)  # step outputs to the event loop
        self._opened = 0  # requests opened (each stream's phase, see stream.py)
        self._ready = threading.Event()  # the engine thread has warmed up (start() waits)
        self.compile_watch = CompileWatch()  # armed once warm: a later compile is a warning
        self._inflight: InFlight | None = None
        self._async = False
        self._stopping = False
        self._failure: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_load_at = float("-inf")
        self.runner: ModelRunner | None = None
        self.pool: BlockPool | None = None
        self.scheduler: Scheduler | None = None
        self._ranks: RankGroup | None = None  # tensor parallel: ranks 1..N-1

    # ---- Engine contract ----------------------------------------------------------

    async def start(self) -> None:
        assert self._thread is None, "NativeEngine.start() called twice"
        self._loop = self._handover.loop = asyncio.get_running_loop()
        config = self.config
        if self.hooks.make_connector is not None:
            config = dataclasses.replace(config, shared_kv=True)
        runner, self._ranks = await in_daemon_thread(load_runner, config, name="native-load")
        self.runner = runner
        self.pool = BlockPool(runner.num_blocks, self.config.block_size,
                              worker_id=self.hooks.worker_id)
        chosen = self.config.async_output
        self._async = runner.graphs is not None if chosen is None else chosen
        self.scheduler = Scheduler(self._scheduler_config(runner), self.pool, self._connector())
        self._thread = threading.Thread(target=self._run, name="native-engine", daemon=True)
        self._thread.start()
        await self._loop.run_in_executor(None, self._ready.wait)

    def _connector(self) -> KvConnector | None:
        """The KV tiers (when configured), behind the hooks' connector (disaggregation) when
        there is one: that connector hands it every request it does not take (`fallback`)."""
        assert self.runner is not None and self.pool is not None
        # Tensor parallel: the other ranks' KV heads, opened here for the transfer plane (only
        # then: on GPUs opening rank r's cache costs this process a CUDA context on GPU r).
        shards: tuple[KvShard, ...] = ()
        if self._ranks is not None and self.hooks.make_connector is not None:
            shards = self._ranks.kv_shards(self.runner)
        kv = EngineKv(self.runner.block_io(), self.runner.shared_region_name(), self._wake,
                      record_event=self.pool.record_event, head_shards=shards)
        tiers = None
        if self.config.tiers.enabled:
            make_tiers = tier_connector_factory(
                self.config.tiers, model_identity(self.config.model_path), self.hooks.metrics_registry)
            tiers = make_tiers(kv)
        if self.hooks.make_connector is None:
            return tiers
        return self.hooks.make_connector(dataclasses.replace(kv, fallback=tiers))

    def _wake(self) -> None:
        """The connector has results: let the engine thread poll them (any thread)."""
        with self._lock:
            self._lock.notify_all()

    def _scheduler_config(self, runner: ModelRunner) -> SchedulerConfig:
        c = self.config
        return SchedulerConfig(
            max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=max(c.max_num_batched_tokens, c.max_num_seqs),
            block_size=c.block_size,
            max_model_len=runner.max_model_len,
            async_output=self._async,
        )

    async def stop(self) -> None:
        self.compile_watch.disarm()
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None and self._loop is not None:
            await self._loop.run_in_executor(None, self._thread.join)
            self._thread = None
        ranks, self._ranks = self._ranks, None
        if ranks is not None:
            await self._loop.run_in_executor(None, ranks.stop)
        self._fail_all("the native engine stopped; retry the request on another worker")
        if self.scheduler is not None and self.scheduler.connector is not None:
            await self._loop.run_in_executor(None, self.scheduler.connector.close)  # type: ignore[union-attr]
        if ranks is not None:
            ranks.close_shards()
        if self.runner is not None and self.runner.kv_memory.region is not None:
            self.runner.kv_memory.region.close()

    def cache_snapshot(self) -> CacheSnapshot | None:
        if self.pool is None:
            return None
        with self._lock:
            return self.pool.snapshot()

    def generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        stream = self._open(request)
        return follow_outputs(stream, functools.partial(self._cancel, stream), context)

    # ---- requests (event loop side) -------------------------------------------------

    def _open(self, request: PreprocessedRequest) -> RequestStream:
        interval = self.config.stream_interval
        self._opened += 1  # second outputs in turn after 1..interval tokens (stream.py)
        stream = RequestStream(request.request_id, request.sampling.logprobs is not None,
                               interval, 1 + self._opened % interval)
        problem = self._failure or self._check_request(request)
        if problem is not None:
            stream.fail(problem)
            return stream
        assert self.scheduler is not None and self.runner is not None
        if request.embed is not None:  # the prompt's last step ends it: one (dropped) token
            request = msgspec.structs.replace(request, stop=StopConditions(max_tokens=1))
        seq = Sequence.from_request(request, seed=request.sampling.seed or 0)
        params = RequestSampling.from_request(
            request.sampling, request.stop, request.eos_token_ids, self.runner.device
        )
        if request.embed is not None:
            params.embed = request.embed
            if request.embed.pooling == "mean":  # every prompt token's state is needed
                seq.isolate_cache(f"embed-mean:{request.request_id}")
        if is_guided(request.sampling.response_format):
            try:
                params.guide = self._guided(request).guide(request.sampling.response_format)
            except (GrammarError, ImportError) as exc:
                stream.fail(f"guided decoding failed: {exc}")
                return stream
        with self._lock:
            try:
                self.scheduler.add(seq)
            except RequestRejected as exc:
                stream.fail(str(exc))
                return stream
            self._streams[seq.request_id] = stream
            self._sampling[seq.request_id] = params
            self.scheduler.prefetch(seq)  # a tier hit starts loading during the step in flight
            if params.reads_tokens:
                self._num_penalized += 1
            if _special(params):
                self._num_special += 1
            self._lock.notify_all()
        return stream

    def _guided(self, request: PreprocessedRequest) -> GuidedDecoding:
        """The engine's grammar machinery, built on the first guided request (it needs the
        EOS ids, which requests carry)."""
        assert self.runner is not None
        if self.runner.sampler.guided is None:
            model_dir = resolve_model_dir(self.config.model_path)
            self.runner.sampler.guided = GuidedDecoding.for_model(
                model_dir, self.runner.cfg.vocab_size, request.eos_token_ids, self.runner.device)
        return self.runner.sampler.guided

    def _check_request(self, request: PreprocessedRequest) -> str | None:
        if self.runner is None:
            return "the native engine has not started; call start() first"
        vocab = self.runner.cfg.vocab_size
        bad = [t for t in request.token_ids if not 0 <= t < vocab]
        if bad:
            return (f"token ids {bad[:5]} are outside the model's vocabulary (0..{vocab - 1}); "
                    "tokenize with this model's tokenizer")
        if request.sampling.n != 1:
            return "the native engine returns one choice per request (n=1); send n requests"
        embed = request.embed
        if embed is not None and embed.pooling not in POOLINGS:
            return f"unknown pooling {embed.pooling!r}; use one of {', '.join(POOLINGS)}"
        if embed is not None and embed.dimensions is not None and not (
                0 < embed.dimensions <= self.runner.cfg.hidden_size):
            return (f"dimensions must be between 1 and the model's hidden size "
                    f"{self.runner.cfg.hidden_size}")
        return None

    def _cancel(self, stream: RequestStream) -> None:
        """End `stream` as cancelled and free its blocks now (no-op once it has ended)."""
        if stream.finished:
            return
        assert self.scheduler is not None
        with self._lock:
            if self._streams.get(stream.request_id) is stream:  # still in flight here
                self._forget(stream.request_id)
                self.scheduler.abort(stream.request_id)
        stream.finish(FINISH_CANCELLED)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if self.runner is not None:
            self.runner.pooler.forget(request_id)
        params = self._sampling.pop(request_id, None)
        if params is not None and params.reads_tokens:
            self._num_penalized -= 1
        if params is not None and _special(params):
            self._num_special -= 1

    def _fail_all(self, message: str) -> None:
        self._failure = message
        with self._lock:
            streams, self._streams = self._streams, {}
            for request_id in streams:
                if self.scheduler is not None:
                    self.scheduler.abort(request_id)
            self._sampling.clear()
            self._num_penalized = self._num_special = 0
        for stream in streams.values():
            stream.fail(message)

    # ---- the loop (engine thread) ---------------------------------------------------

    def _run(self) -> None:
        self._warm_thread()
        while self._wait_for_work():
            self.step()
        self._complete()

    def _warm_thread(self) -> None:
        """On CUDA, the runner's start-up warm-up ran on the loading thread; run its short
        requests once more on this one, before start() returns, so nothing the first request
        needs is first done here (the first request after start-up measured ~0.9 s before),
        and build the attention backend's per-thread plans (cuDNN's, for long prompts)."""
        try:
            runner = self.runner
            if runner is not None and runner.device.type == "cuda":
                started = time.perf_counter()
                plans = runner.warm_attention()
                steps = warm_serving_path(runner) if self._ranks is None else 0
                log.info("native engine: engine thread warmed (%d steps%s) in %.2fs", steps,
                         f", attention plans for {len(plans)} prompt lengths {plans[0]}-{plans[-1]}"
                         if plans else "", time.perf_counter() - started)
        except Exception:  # a slower first request, not a dead engine
            log.exception("native engine: warm-up on the engine thread failed")
        finally:
            if self.runner is not None and self.runner.device.type == "cuda":
                self.compile_watch.arm()
            self._ready.set()

    def _wait_for_work(self) -> bool:
        assert self.scheduler is not None
        with self._lock:
            if self.scheduler.has_work() or self._stopping:
                return not self._stopping
        self._complete()  # idle from here on: finish the step in flight first
        with self._lock:
            if not self.scheduler.has_work() and not self._stopping:
                self._handover.publish(self._drain())  # idle: let routers see the empty state
            while not self.scheduler.has_work() and not self._stopping:
                self._lock.wait()
            return not self._stopping

    def step(self) -> None:
        """One iteration: schedule -> execute -> update (async output: execute this step,
        then update the one before while the device runs this one).

        Async output hands a step's outputs to the event loop only after the next step is
        launched: waking hundreds of request tasks holds the GIL for a while, and it then
        overlaps the wait for the device instead of delaying the launch (at the cost of
        delivering each token later by one schedule and launch). Not while a request needs
        the sampler's own path (logprobs...): such a launch may wait for the device."""
        assert self.scheduler is not None
        with self._lock:
            out = self.scheduler.schedule()
        if self._num_penalized:  # penalties read the real tokens of the step in flight
            self._complete()
        started = time.perf_counter()
        special = bool(self._num_special)
        if special:
            self._handover.flush()
        launched = self._launch(out)
        self._handover.flush()
        if not out.scheduled and self._inflight is None:
            time.sleep(0.001)  # nothing fits right now; let cancellations free blocks
        self._complete(hold=self._async and not special)
        self._inflight = InFlight(out, launched, started)
        if not self._async:
            self._complete()

    def _launch(self, out: SchedulerOutput) -> Launched | None:
        assert self.runner is not None
        try:
            with self._lock:  # the event loop may cancel (and free) sequences meanwhile
                live = [s for s in out.scheduled if s.seq.status is not SeqStatus.FINISHED]
                inputs = self.runner.prepare(live) if live else None
                greedy_plain = not self._num_special
            if inputs is None:
                return None
            return self.runner.launch(inputs, self._sampling, greedy_plain=greedy_plain)
        except Exception as exc:  # a failed step fails its requests, not the worker
            log.exception("native engine step failed")
            self._fail_step(out, f"the model step failed: {exc!r}; retry the request")
            return None

    def _complete(self, hold: bool = False) -> None:
        """Collect and update the step in flight, if any, and hand its tokens over (`hold`:
        keep them back until the handover's next flush or send)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            self._handover.flush()
            return
        assert self.scheduler is not None
        result = self._collect(inflight)
        self._advance_guides(result)
        self._observe_prefill(inflight)
        with self._lock:
            finished = self.scheduler.update(result.sampled)
            deliveries = self._deliveries(inflight.out, result, finished)
            published = self._drain()
        (self._handover.hold if hold else self._handover.send)(deliveries, published)

    def _advance_guides(self, result: StepResult) -> None:
        if not self._num_penalized:
            return
        for rid, tokens in result.sampled.items():
            params = self._sampling.get(rid)
            if params is not None and params.guide is not None:
                params.guide.advance(tokens)

    def _observe_prefill(self, inflight: InFlight) -> None:
        """Tell the KV connector how fast this step computed prompt tokens (tiers' policy)."""
        connector = self.scheduler.connector if self.scheduler is not None else None
        if connector is None or inflight.launched is None:
            return
        tokens = sum(s.num_new_tokens for s in inflight.out.scheduled if s.is_prefill)
        if tokens:
            connector.observe_step(tokens, time.perf_counter() - inflight.started)

    def _collect(self, inflight: InFlight) -> StepResult:
        assert self.runner is not None
        if inflight.launched is None:
            return StepResult({}, {})
        try:
            return self.runner.collect(inflight.launched)
        except Exception as exc:
            log.exception("native engine step failed")
            self._fail_step(inflight.out, f"the model step failed: {exc!r}; retry the request")
            return StepResult({}, {})

    def _fail_step(self, out: SchedulerOutput, message: str) -> None:
        assert self.scheduler is not None
        with self._lock:
            failed = [s.seq.request_id for s in out.scheduled]
            streams = [self._streams.get(rid) for rid in failed]
            for rid in failed:
                self.scheduler.abort(rid)
                self._forget(rid)
        errors = [Delivery(s, [], error=message, finish_reason=FINISH_ERROR)
                  for s in streams if s is not None]
        self._handover.send(Deliveries([], errors), ([], None))  # after any held tokens

    def _deliveries(
        self, out: SchedulerOutput, result: StepResult, finished: list[FinishedSeq]
    ) -> Deliveries:
        """What each stream gets from this step: a plain token (the common decode case: no
        finish, logprobs, embedding or first-token details) as a (stream, tokens) pair, the
        rest as a full Delivery."""
        reasons = {f.seq.request_id: f.reason for f in finished}
        streams, sampled = self._streams, result.sampled
        details = bool(result.logprobs or result.embeddings)
        plain: list[tuple[RequestStream, list[int]]] = []
        deliveries: list[Delivery] = []
        for s in out.scheduled:
            seq = s.seq
            rid = seq.request_id
            new = sampled.get(rid)
            stream = streams.get(rid)
            if new is None or stream is None:
                continue
            reason = reasons.get(rid) if reasons else None
            if reason is None:
                if seq.status is SeqStatus.FINISHED:
                    continue  # ended by the step before (async output): this token is dropped
                if not details and len(seq.token_ids) - seq.prompt_len != 1:
                    plain.append((stream, new))
                    continue
            deliveries.append(self._delivery(stream, seq, result, reason))
            if reason is not None:
                self._forget(rid)
        return Deliveries(plain, deliveries)

    def _delivery(
        self, stream: RequestStream, seq: Sequence, result: StepResult, reason: str | None
    ) -> Delivery:
        rid = seq.request_id
        d = Delivery(stream, result.sampled[rid], finish_reason=reason)
        if rid in result.embeddings:  # an embedding request ends with its prompt
            d.embedding, d.token_ids, d.finish_reason = result.embeddings[rid], [], FINISH_STOP
        lp = result.logprobs.get(rid)
        if lp is not None:
            d.logprobs, d.top_logprobs = [lp.logprob], [lp.top]
        if seq.num_output_tokens == 1:
            d.cached_tokens = max(seq.num_cached_tokens, 0)
            d.cached_by_tier = seq.cached_by_tier
            d.kv_transfer = seq.kv_transfer
        return d

    def _drain(self) -> Published:
        assert self.pool is not None and self.scheduler is not None
        events = self.pool.drain_events()
        now = time.monotonic()
        idle = not self.scheduler.has_work()
        if not idle and now - self._last_load_at < LOAD_INTERVAL_S:
            return events, None
        self._last_load_at = now
        return events, self.scheduler.load_metrics()


def _special(params: RequestSampling) -> bool:
    """Whether a request's rows need the sampler's per-row path (not a graph's argmax)."""
    return not (params.greedy and params.plain) or params.embed is not None
