"""The disaggregation connector: prefill workers hold a prompt's blocks, decode workers pull them.

One `KvConnector` (kvflow.kv.connector) for every engine, driven by the request's typed
hint (`DisaggHint` on `Sequence.disagg`):

- prefill half: when the request finishes, its blocks are kept in the transfer agent's
  hold table under the transfer id (a lease releases them if nobody pulls).
- decode half: at admission, every prompt token but the last one that the local prefix
  cache does not already hold is loaded asynchronously: the agent pulls the source's
  blocks into the request's new blocks (the mocker first waits the modelled transfer
  time). A failed pull makes the request recompute locally, and it is never retried.

Anything else goes to the engine's own connector (`fallback`, e.g. the mocker's host
tier). Loads run on the worker's event loop; results are queued for the scheduler and
the engine is woken (`EngineKv.wake`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Sequence

from kvflow.kv.connector import (
    NO_EXTERNAL,
    BaseConnector,
    ConnectorFactory,
    ConnectorSeq,
    EngineKv,
    ExternalMatch,
    KvConnector,
    LoadResult,
)
from kvflow.kv.transfer.agent import TransferAgent, TransferConfig, TransferFailed
from kvflow.kv.transfer.metrics import TransferMetrics
from kvflow.llm.kv_events import LoadMetrics
from kvflow.llm.protocol import PHASE_DECODE, PHASE_PREFILL
from kvflow.runtime import DistributedRuntime

log = logging.getLogger(__name__)


class DisaggConnector(BaseConnector):
    """Holds prefill results for transfer and loads decode requests' prompt KV from peers."""

    def __init__(self, kv: EngineKv, agent: TransferAgent, loop: asyncio.AbstractEventLoop) -> None:
        self.kv = kv
        self.agent = agent
        self.loop = loop
        self.block_size = kv.io.layout.block_size
        self.fallback: KvConnector = kv.fallback or BaseConnector()
        self._loads: deque[LoadResult] = deque()
        self._released: deque[list[int]] = deque()
        self._failed: set[str] = set()  # request ids whose pull failed: recompute, never retry
        self._lock = threading.Lock()
        self.num_remote_loads = 0
        self.num_local_fallbacks = 0

    def release(self, block_ids: list[int]) -> None:
        """HoldTable's on_release: any thread; the scheduler frees them at its next poll."""
        self._released.append(block_ids)
        self.kv.wake()

    # ---- scheduler hooks ----------------------------------------------------------------

    def match_external(self, seq: ConnectorSeq, num_local_tokens: int) -> ExternalMatch:
        hint = seq.disagg
        if hint is None or hint.phase != PHASE_DECODE:
            return self.fallback.match_external(seq, num_local_tokens)
        with self._lock:
            failed = seq.request_id in self._failed
        if failed or seq.num_preemptions:
            return NO_EXTERNAL  # recompute locally: the remote copy is gone or untrusted
        n = min(hint.num_tokens, seq.num_tokens - 1) - num_local_tokens
        if n <= 0:
            self._release_remote(hint.source_worker, hint.transfer_id)
            return NO_EXTERNAL
        return ExternalMatch(num_tokens=n, load_async=True)

    def start_load(self, seq: ConnectorSeq, block_ids: Sequence[int], num_tokens: int) -> None:
        if seq.disagg is None:
            self.fallback.start_load(seq, block_ids, num_tokens)
            return
        first = seq.num_computed_tokens // self.block_size
        coro = self._load(seq, first, list(block_ids), num_tokens)
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def request_finished(self, seq: ConnectorSeq) -> bool:
        hint = seq.disagg
        if hint is None or hint.phase != PHASE_PREFILL:
            if hint is not None:
                self.forget(seq.request_id)
            return self.fallback.request_finished(seq)
        self.agent.holds.add(hint.transfer_id, list(seq.block_ids), seq.prompt_len)
        return True

    def before_evict(self, block_ids: Sequence[int], seq_hashes: Sequence[int]) -> None:
        self.fallback.before_evict(block_ids, seq_hashes)

    def take_finished_loads(self) -> list[LoadResult]:
        out = _drain(self._loads)
        return out + self.fallback.take_finished_loads() if self.kv.fallback else out

    def take_released(self) -> list[list[int]]:
        out = _drain(self._released)
        return out + self.fallback.take_released() if self.kv.fallback else out

    def has_pending(self) -> bool:
        return bool(self._loads or self._released) or self.fallback.has_pending()

    def observe_step(self, num_prefill_tokens: int, seconds: float) -> None:
        self.fallback.observe_step(num_prefill_tokens, seconds)

    def fill_load_metrics(self, metrics: LoadMetrics) -> None:
        self.fallback.fill_load_metrics(metrics)

    def close(self) -> None:
        self.fallback.close()

    # ---- loads (event loop) -------------------------------------------------------------

    async def _load(self, seq: ConnectorSeq, first: int, blocks: list[int], n: int) -> None:
        hint = seq.disagg
        assert hint is not None
        try:
            await asyncio.sleep(self.kv.modelled_s(n))  # the mocker's wire time, before the data
            stats = await self.agent.pull(hint.source_worker, hint.transfer_id, first, blocks)
            result = LoadResult(seq.request_id, True, stats=stats)
            self.num_remote_loads += 1
        except TransferFailed as exc:
            log.warning("request %s: KV pull failed, recomputing locally: %s", seq.request_id, exc)
            with self._lock:
                self._failed.add(seq.request_id)
            self.num_local_fallbacks += 1
            result = LoadResult(seq.request_id, False, str(exc))
        self._loads.append(result)
        self.kv.wake()

    def _release_remote(self, source: int, transfer_id: str) -> None:
        """Nothing to pull (a local prefix hit covers it): let the holder free its blocks now."""
        asyncio.run_coroutine_threadsafe(self._release(source, transfer_id), self.loop)

    async def _release(self, source: int, transfer_id: str) -> None:
        try:
            await self.agent.release(source, transfer_id)
        except Exception as exc:  # the lease frees them anyway
            log.debug("release of %s on %x failed: %r", transfer_id, source, exc)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._failed.discard(request_id)


def _drain(queue: deque) -> list:
    out = []
    while queue:
        out.append(queue.popleft())
    return out


def disagg_connector_factory(
    runtime: DistributedRuntime, component: str, worker_id: int, config: TransferConfig,
    metrics: TransferMetrics, agents: list[TransferAgent],
) -> ConnectorFactory:
    """A factory an engine calls once its KV exists: an agent (appended to `agents`, for the
    worker to start and close) and the connector in front of it. Call it on the worker's
    event loop; `make` may then run on any thread (engines are built off the loop)."""
    loop = asyncio.get_running_loop()

    def make(kv: EngineKv) -> DisaggConnector:
        connector: list[DisaggConnector] = []
        agent = TransferAgent(runtime, component, worker_id, kv.io,
                              lambda blocks: connector[0].release(blocks),
                              shm_name=kv.shm_name, config=config, metrics=metrics,
                              head_shards=kv.head_shards)
        connector.append(DisaggConnector(kv, agent, loop))
        agents.append(agent)
        return connector[0]

    return make
