"""Disaggregated serving in the frontend: a prefill stage before decode, decided per request.

When a model has prefill workers (registered with role "prefill"), each request runs:

    decode worker  <- the decode pool's KV router (overlap + load), booked first
    plan           <- plan_prefill(): remote prefill, or prefill locally on that decode worker
    prefill stage  <- the prefill pool's KV router (overlap + prefill load); the prompt runs
                      there with max_tokens=1 and its blocks are held under a transfer id
    decode stage   <- the request goes to the decode worker with a DisaggHint: it pulls the
                      blocks (kvflow.kv.disagg) and continues; the client sees one stream

The rule (`plan_prefill`, flags `--disagg-*`): prefill remotely when the prompt's tokens
not already cached on the chosen decode worker are at least `min_remote_prefill_tokens`
(short prompts cost less to prefill in place than to move), and the least loaded prefill
worker has at most `max_prefill_queue_tokens` waiting (else the decode worker is faster).
`mode` "always" / "never" force either side. In conditional mode a request prefilled in
place runs whole on whichever pool's best worker the router scores cheaper
(`lend_prefill_workers`), so short prompts use prefill workers too. A prefill worker
that dies, errors or takes longer than `prefill_timeout_s` is avoided and the next one
is tried, then local prefill.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import asdict, dataclass, field

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from kvflow.frontend.engine_client import EngineUnavailable
from kvflow.frontend.routed import RoutedEngineClient
from kvflow.kv.transfer.metrics import metrics_for
from kvflow.llm.protocol import (
    FINISH_ERROR,
    PHASE_DECODE,
    PHASE_PREFILL,
    DisaggHint,
    EngineOutput,
    PreprocessedRequest,
    RoutingHints,
)
from kvflow.llm.register import ROLE_AGGREGATED, ROLE_DECODE, ROLE_PREFILL
from kvflow.router.cost import RoutingDecision
from kvflow.router.observe import RouterView
from kvflow.runtime import Context

log = logging.getLogger(__name__)
MODES = ("conditional", "always", "never")


@dataclass(frozen=True)
class DisaggConfig:
    mode: str = "conditional"
    min_remote_prefill_tokens: int = 512  # uncached prompt tokens worth moving instead
    max_prefill_queue_tokens: int = 16384  # least loaded prefill worker's queue, at most
    prefill_timeout_s: float = 30.0  # one prefill attempt, then the next worker / local
    max_prefill_attempts: int = 2
    # conditional: a request prefilled in place may run whole on a prefill worker that
    # costs less than the best decode worker (short prompts use the whole fleet)
    lend_prefill_workers: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--disagg-mode {self.mode!r} is not one of {', '.join(MODES)}")


@dataclass(frozen=True)
class PrefillPlan:
    remote: bool
    reason: str
    uncached_tokens: int


def plan_prefill(
    num_tokens: int, decode_cached_tokens: int, prefill_queue_tokens: int | None,
    config: DisaggConfig,
) -> PrefillPlan:
    """Where to prefill one request (pure: the module doc states the rule)."""
    uncached = max(num_tokens - decode_cached_tokens, 0)
    if config.mode == "never" or prefill_queue_tokens is None:
        return PrefillPlan(False, "disabled" if config.mode == "never" else "no_prefill_workers",
                           uncached)
    if config.mode == "always":
        return PrefillPlan(True, "always", uncached)
    if uncached < config.min_remote_prefill_tokens:
        return PrefillPlan(False, "short_or_cached", uncached)
    if prefill_queue_tokens > config.max_prefill_queue_tokens:
        return PrefillPlan(False, "prefill_busy", uncached)
    return PrefillPlan(True, "long_prompt", uncached)


@dataclass
class RequestTiming:
    """One disaggregated request's time split, in seconds (for /debug and the logs)."""

    request_id: str
    prefill_worker: int
    decode_worker: int
    prefill_s: float  # prefill queue + prefill, as the frontend saw it
    transfer_s: float = 0.0  # the decode worker's pull
    decode_first_s: float = 0.0  # decode queue + first decode step (transfer excluded)
    kv_bytes: int = 0
    backend: str = ""
    model: str = ""
    at: float = field(default_factory=time.time)  # wall clock when the prefill stage ended


@dataclass(frozen=True)
class ModelFleet:
    """One model's part of /fleet: its pools' router views by role, its recent KV transfers."""

    pools: list[tuple[str, RouterView]]
    transfers: list[RequestTiming]


class DisaggStats:
    """Decisions, transfers (kvflow_kv_transfer_*) and recent timings, on one registry."""

    def __init__(self, registry: CollectorRegistry, keep: int = 64) -> None:
        self.transfers = metrics_for(registry)
        self.decisions = Counter("kvflow_disagg_prefill_decisions",
                                 "Where requests were prefilled (remote / local) and why",
                                 ["model", "where", "reason"], registry=registry)
        self.prefill_seconds = Histogram("kvflow_disagg_prefill_seconds",
                                         "Remote prefill stage time (queue + prefill)",
                                         ["model"], registry=registry)
        self.recent: collections.deque[RequestTiming] = collections.deque(maxlen=keep)

    def decided(self, model: str, plan: PrefillPlan) -> None:
        self.decisions.labels(model, "remote" if plan.remote else "local", plan.reason).inc()

    def finished(self, model: str, timing: RequestTiming) -> None:
        self.recent.append(timing)
        self.prefill_seconds.labels(model).observe(timing.prefill_s)
        log.debug("disagg timing %s", timing)

    def recent_json(self) -> list[dict]:
        return [asdict(t) for t in self.recent]


class DisaggClient:
    """An ExcludingClient: decode pool + optional prefill pool of one model (module doc)."""

    def __init__(
        self, model: str, decode: RoutedEngineClient,
        prefill: Callable[[], RoutedEngineClient | None], config: DisaggConfig,
        stats: DisaggStats, block_size: int,
    ) -> None:
        self.model = model
        self.decode = decode
        self.prefill = prefill
        self.config = config
        self.stats = stats
        self.block_size = block_size

    def live_workers(self) -> int:
        return self.decode.live_workers()

    def fleet(self) -> ModelFleet:
        """/fleet's view: the decode pool ("aggregated" while the model has no prefill
        worker), the prefill pool, and this model's recent disaggregated requests."""
        pool = self.prefill()
        if pool is None:
            return ModelFleet([(ROLE_AGGREGATED, self.decode.routed.view())], [])
        transfers = [t for t in self.stats.recent if t.model == self.model]
        return ModelFleet([(ROLE_DECODE, self.decode.routed.view()),
                           (ROLE_PREFILL, pool.routed.view())], transfers)

    def explain(self, request: PreprocessedRequest) -> bytes:
        """/debug/route: the decode pool's decision; with a prefill pool, also the prefill
        pool's, the plan, and the time split of recent disaggregated requests."""
        decode = self.decode.routed.explain(request)
        pool = self.prefill()
        if pool is None:
            return decode.as_json()
        body = {
            "decode": msgspec.json.decode(decode.as_json()),
            "prefill": msgspec.json.decode(pool.routed.explain(request).as_json()),
            "plan": asdict(self.plan(request, decode, pool)),
            "recent": self.stats.recent_json(),
        }
        return msgspec.json.encode(body)

    def generate(
        self, request: PreprocessedRequest, context: Context, exclude: Collection[int] = ()
    ) -> AsyncIterator[EngineOutput]:
        """The decode pool's stream as it is while the model has no prefill worker (no extra
        generator layer per token); otherwise the two-step path."""
        pool = self.prefill()
        if pool is None or pool.live_workers() == 0:
            return self.decode.generate(request, context, exclude)
        return self._split(pool, request, context, exclude)

    async def _split(
        self, pool: RoutedEngineClient, request: PreprocessedRequest, context: Context,
        exclude: Collection[int],
    ) -> AsyncIterator[EngineOutput]:
        plan = self.plan(request, self.decode.routed.explain(request), pool)
        self.stats.decided(self.model, plan)
        if not plan.remote:
            async for out in self._local_pool(request, pool).generate(request, context, exclude):
                yield out
            return
        decision = await self.decode.schedule(request, exclude)
        try:
            request, timing = await self._prefill(pool, request, decision.worker_id, context)
        except BaseException:
            self.decode.unbook(request)  # the decode stream never opened
            raise
        started = time.perf_counter()
        first = True
        async for out in self.decode.stream(request, decision.worker_id, context):
            if first and timing is not None:
                first = False
                self._first_output(out, timing, time.perf_counter() - started)
            yield out

    def plan(
        self, request: PreprocessedRequest, decision: RoutingDecision, pool: RoutedEngineClient
    ) -> PrefillPlan:
        queue: int | None = 0
        if self.config.mode == "conditional":  # the prefill pool's load matters only here
            loads = pool.routed.explain(request).loads.values()
            queue = min((load.prefill_tokens for load in loads), default=None)
        cached = decision.overlap_blocks * self.block_size
        return plan_prefill(len(request.token_ids), cached, queue, self.config)

    def _local_pool(self, request: PreprocessedRequest, pool: RoutedEngineClient) -> RoutedEngineClient:
        """Where a request prefilled in place runs whole: the decode pool, or (conditional
        mode, `lend_prefill_workers`) the prefill pool when its best worker costs less."""
        if self.config.mode != "conditional" or not self.config.lend_prefill_workers:
            return self.decode
        decode = self.decode.routed.explain(request)
        prefill = pool.routed.explain(request)
        if not decode.costs or not prefill.costs:
            return self.decode
        return pool if min(prefill.costs.values()) < min(decode.costs.values()) else self.decode

    def _first_output(self, out: EngineOutput, timing: RequestTiming, waited: float) -> None:
        stats = out.kv_transfer
        if stats is not None:
            timing.transfer_s, timing.kv_bytes, timing.backend = stats.seconds, stats.bytes, stats.backend
            self.stats.transfers.moved(stats.backend, stats.bytes, stats.blocks, stats.seconds,
                                       reporter="frontend")
        timing.decode_first_s = max(waited - timing.transfer_s, 0.0)
        self.stats.finished(self.model, timing)

    async def _prefill(
        self, pool: RoutedEngineClient, request: PreprocessedRequest, decode_worker: int,
        context: Context,
    ) -> tuple[PreprocessedRequest, RequestTiming | None]:
        """Prefill on a prefill worker; the decode request (with its hint), or the request
        unchanged (prefill locally) when every attempt failed."""
        tried: list[int] = []
        for _ in range(self.config.max_prefill_attempts):
            started = time.perf_counter()
            hint = await self._attempt(pool, request, tried, context)
            if context.is_stopped():
                break
            if hint is not None:
                routing = request.routing or RoutingHints()
                decode_request = msgspec.structs.replace(
                    request, routing=msgspec.structs.replace(routing, disagg=hint))
                timing = RequestTiming(request.request_id, hint.source_worker, decode_worker,
                                       time.perf_counter() - started, model=self.model)
                return decode_request, timing
        self.stats.decisions.labels(self.model, "local", "prefill_failed").inc()
        return request, None

    async def _attempt(
        self, pool: RoutedEngineClient, request: PreprocessedRequest, tried: list[int],
        context: Context,
    ) -> DisaggHint | None:
        transfer_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        prefill_request = _prefill_request(request, transfer_id)
        try:
            decision = await pool.schedule(prefill_request, tried)
        except EngineUnavailable:
            return None
        worker = decision.worker_id
        tried.append(worker)
        sub = Context(transfer_id)  # stops with the client's request, or on our timeout
        context.on_stop(sub.stop_generating)
        try:
            ok = await asyncio.wait_for(
                self._run(pool, prefill_request, worker, sub), self.config.prefill_timeout_s)
        except (asyncio.TimeoutError, EngineUnavailable) as exc:
            log.warning("request %s: prefill on worker %x failed (%s); trying elsewhere",
                        request.request_id, worker, exc or "timeout")
            sub.stop_generating()
            pool.mark_down(worker)
            return None
        finally:
            context.remove_on_stop(sub.stop_generating)
        if not ok:
            return None
        return DisaggHint(PHASE_DECODE, transfer_id, worker, len(request.token_ids))

    @staticmethod
    async def _run(
        pool: RoutedEngineClient, request: PreprocessedRequest, worker: int, context: Context
    ) -> bool:
        last: EngineOutput | None = None
        async for out in pool.stream(request, worker, context):
            last = out
        if last is None or last.finish_reason == FINISH_ERROR:
            log.warning("prefill of %s on worker %x ended with an error: %s", request.request_id,
                        worker, last.error if last else "no output")
            return False
        return True


def _prefill_request(request: PreprocessedRequest, transfer_id: str) -> PreprocessedRequest:
    """The prompt alone, one token, its blocks kept for `transfer_id`."""
    stop = msgspec.structs.replace(request.stop, max_tokens=1, min_tokens=None)
    routing = msgspec.structs.replace(request.routing or RoutingHints(),
                                      disagg=DisaggHint(PHASE_PREFILL, transfer_id))
    sampling = msgspec.structs.replace(request.sampling, n=1, logprobs=None)
    return msgspec.structs.replace(request, request_id=transfer_id, stop=stop, routing=routing,
                                   sampling=sampling, prior_output_tokens=0)
