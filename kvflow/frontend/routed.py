"""RoutedEngineClient: the frontend's engine client over the runtime, with worker health.

Used for a model's decode (or aggregated) pool and for its prefill pool
(frontend.disagg); `schedule` then `stream` is `generate` in two steps, so a caller can
act between picking the worker and sending the request.

The KV router picks a worker among those `WorkerHealth` allows; the request streams
from it while a `StallMonitor` watches the stream; a `Canary` pings the workers
between requests. A worker that is lost (connection dropped, refusal) or stalls
raises `WorkerLost` naming it, which `MigratingClient` turns into a continuation on
another worker.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field

from kvflow.frontend.admission import EngineOverloaded
from kvflow.frontend.canary import Canary, CanaryConfig
from kvflow.frontend.engine_client import EngineUnavailable
from kvflow.frontend.migration import WorkerLost
from kvflow.frontend.stalls import StallConfig, StallMonitor, StallWatch
from kvflow.frontend.timeline import Timeline, current_timeline
from kvflow.frontend.worker_health import Avoidance, WorkerHealth
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.router.cost import RoutingDecision
from kvflow.router.errors import RouterError, RouterOverloadedError
from kvflow.router.service import KvRoutedClient
from kvflow.runtime import Context, NoInstancesError, WorkerUnavailableError


@dataclass(frozen=True)
class HealthSettings:
    """Stall detection, canary and avoidance of one model's workers; hooks for metrics."""

    stalls: StallConfig = field(default_factory=StallConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    avoidance: Avoidance = field(default_factory=Avoidance)
    on_stall: Callable[[StallWatch], None] | None = None
    on_canary_failure: Callable[[int], None] | None = None


class RoutedEngineClient:
    """EngineClient over the runtime: the KV router picks a worker, the request streams from it.

    `exclude` keeps a request away from workers it already lost; `health` keeps new
    requests away from workers recently lost or suspect (frontend.worker_health).
    """

    def __init__(self, routed: KvRoutedClient, settings: HealthSettings | None = None) -> None:
        self.routed = routed
        s = self.settings = settings or HealthSettings()
        self.health = WorkerHealth(s.avoidance, proof_by_ping=s.canary.enabled)
        self.stalls = StallMonitor(s.stalls, routed.instance_ids, self._on_stall)
        self.canary = Canary(s.canary, routed.instance_ids, routed.ping, self.health,
                             s.on_canary_failure)
        self.canary.start()

    async def generate(
        self, request: PreprocessedRequest, context: Context, exclude: Collection[int] = ()
    ) -> AsyncIterator[EngineOutput]:
        timeline = current_timeline()
        decision = await self.schedule(request, exclude, timeline)
        async for out in self.stream(request, decision.worker_id, context, timeline):
            yield out

    async def stream(
        self, request: PreprocessedRequest, worker: int, context: Context,
        timeline: Timeline | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Stream from a scheduled worker; a lost or stalled worker raises WorkerLost."""
        attempt = timeline.attempt(request, worker) if timeline is not None else None
        watch = self.stalls.watch(worker, len(request.token_ids))
        error: str | None = None
        try:
            async for out in self.routed.stream(request, worker, context, watch.attach):
                if out.finish_reason is not None and attempt is not None:
                    attempt.end(error=None)  # the attempt is over with its last output
                    attempt = None
                yield out
        except (WorkerUnavailableError, NoInstancesError) as exc:
            if not watch.stalled:
                self.health.lost(worker)
            what = f"stalled ({watch.stalled})" if watch.stalled else f"was lost ({exc})"
            error = f"worker {worker:x} {what}"
            raise WorkerLost(error, worker, stalled=bool(watch.stalled)) from exc
        finally:
            self.stalls.unwatch(watch)
            if attempt is not None:
                attempt.end(error=error)

    def unbook(self, request: PreprocessedRequest) -> None:
        """Forget a scheduled request that will never be streamed (the router's load)."""
        self.routed.router.on_finished(request.request_id)

    def mark_down(self, worker: int) -> None:
        """New requests avoid `worker` (it was lost, or timed out) until it proves alive."""
        self.health.lost(worker)

    def _on_stall(self, watch: StallWatch) -> None:
        self.health.suspect(watch.worker)
        if self.settings.on_stall is not None:
            self.settings.on_stall(watch)

    def _candidates(self, exclude: Collection[int]) -> tuple[list[int], list[int]]:
        """(live workers, those this request may use)."""
        ids = self.routed.instance_ids()
        self.health.forget(ids)
        return ids, self.health.usable(ids, exclude)

    async def schedule(self, request: PreprocessedRequest, exclude: Collection[int] = (),
                       timeline: Timeline | None = None) -> RoutingDecision:
        """Pick a worker (KV overlap + load) among the usable ones and book the request there."""
        started = time.perf_counter()
        ids, candidates = self._candidates(exclude)
        if not candidates:
            raise EngineUnavailable(
                "no live worker" if not ids else f"none of the {len(ids)} live workers can take "
                "the request now (lost by this request already, or not answering)")
        first: list[list[int]] = [candidates]

        def usable() -> list[int]:
            """The router's first ask gets the list just computed; while the request waits
            at a busy router it is asked again, so a worker that joins counts."""
            return first.pop() if first else self._candidates(exclude)[1]

        try:
            decision = await self.routed.schedule(request, usable)
        except RouterOverloadedError as exc:
            raise EngineOverloaded(str(exc), exc.retry_after_s) from exc
        except (RouterError, NoInstancesError) as exc:
            raise EngineUnavailable(str(exc)) from exc
        if timeline is not None:
            timeline.routed(started, decision)
        return decision

    def live_workers(self) -> int:
        """Workers in discovery whose connection has not just failed and that are not suspect
        (stalled, or silent to the canary)."""
        return sum(not self.health.is_suspect(w) for w in self.routed.live_instance_ids())

    async def close(self) -> None:
        await self.canary.close()
        await self.stalls.close()
        await self.routed.close()
