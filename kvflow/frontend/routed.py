"""RoutedEngineClient: one pool of workers behind the KV router, avoiding recently lost ones.

Used for a model's decode (or aggregated) pool and for its prefill pool
(frontend.disagg); `schedule` then `stream` is `generate` in two steps, so a caller can
act between picking the worker and sending the request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection

from kvflow.frontend.admission import EngineOverloaded
from kvflow.frontend.engine_client import EngineUnavailable
from kvflow.frontend.migration import WorkerLost
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.router.cost import RoutingDecision
from kvflow.router.errors import RouterError, RouterOverloadedError
from kvflow.router.service import KvRoutedClient
from kvflow.runtime import Context, NoInstancesError, WorkerUnavailableError


class RoutedEngineClient:
    """EngineClient over the runtime: the KV router picks a worker, the request streams from it.

    `routed` follows the workers, feeds the router and streams from the chosen worker.
    `exclude` keeps a request away from workers it already lost; a lost worker raises
    WorkerLost naming it, and new requests avoid it for `down_s` (until discovery drops
    it, or it proves alive).
    """

    def __init__(self, routed: KvRoutedClient, down_s: float = 2.0) -> None:
        self.routed = routed
        self.down_s = down_s
        self._down: dict[int, float] = {}  # worker id -> monotonic time it may be tried again

    async def generate(
        self, request: PreprocessedRequest, context: Context, exclude: Collection[int] = ()
    ) -> AsyncIterator[EngineOutput]:
        decision = await self.schedule(request, exclude)
        async for out in self.stream(request, decision.worker_id, context):
            yield out

    async def stream(
        self, request: PreprocessedRequest, worker: int, context: Context
    ) -> AsyncIterator[EngineOutput]:
        """Stream from a scheduled worker; a lost worker raises WorkerLost and is avoided."""
        try:
            async for out in self.routed.stream(request, worker, context):
                yield out
        except (WorkerUnavailableError, NoInstancesError) as exc:
            self.mark_down(worker)
            raise WorkerLost(f"worker {worker:x} was lost ({exc})", worker) from exc

    def unbook(self, request: PreprocessedRequest) -> None:
        """Forget a scheduled request that will never be streamed (the router's load)."""
        self.routed.router.on_finished(request.request_id)

    def mark_down(self, worker: int) -> None:
        """New requests avoid `worker` for `down_s` (it was lost, or timed out)."""
        self._down[worker] = time.monotonic() + self.down_s

    def _candidates(self, exclude: Collection[int]) -> tuple[list[int], list[int]]:
        """(live workers, those this request may use): not excluded, and not recently lost
        unless only recently lost ones remain."""
        ids = self.routed.instance_ids()
        usable = [w for w in ids if w not in exclude] if exclude else ids
        if self._down:
            now = time.monotonic()
            self._down = {w: t for w, t in self._down.items() if t > now}
            usable = [w for w in usable if w not in self._down] or usable
        return ids, usable

    async def schedule(
        self, request: PreprocessedRequest, exclude: Collection[int] = ()
    ) -> RoutingDecision:
        """Pick a worker (KV overlap + load) and book the request there."""
        ids, candidates = self._candidates(exclude)
        if not candidates:
            raise EngineUnavailable(
                "no live worker" if not ids else f"every live worker ({len(ids)}) was lost by "
                "this request already")
        try:
            return await self.routed.schedule(request, candidates)
        except RouterOverloadedError as exc:
            raise EngineOverloaded(str(exc), exc.retry_after_s) from exc
        except (RouterError, NoInstancesError) as exc:
            raise EngineUnavailable(str(exc)) from exc

    def live_workers(self) -> int:
        return self.routed.live_workers()

    async def close(self) -> None:
        await self.routed.close()
