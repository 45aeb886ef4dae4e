"""The mocker engine: the real scheduler and block pool, with the model replaced by a clock.

One asyncio task per engine runs the loop `schedule -> simulate -> update`: it sleeps
for the timing model's step time (divided by speedup_ratio; 0 means only yield to
the event loop), picks output tokens from the output mode, and hands each request's
new tokens to its stream. KV events go out once per step, load metrics at most every
`LOAD_INTERVAL_S` and when the engine goes idle. Many engines share one event loop:
per token there is one list append, one future and one EngineOutput.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator

from kvflow.engines.base import EngineHooks
from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.outputs import follow_outputs
from kvflow.engines.core.scheduler import FinishedSeq, RequestRejected, Scheduler, SchedulerOutput
from kvflow.engines.core.sequence import Sequence
from kvflow.engines.mocker.config import MockerConfig
from kvflow.engines.mocker.outputs import make_output, sequence_seed
from kvflow.engines.mocker.sim_tiers import SharedSimStore, TieredMockerConnector, make_sim_tiers
from kvflow.engines.mocker.stream import OutputStream
from kvflow.engines.mocker.tiers import HostTier, MockerConnector
from kvflow.engines.mocker.timing import TimingModel, TimingParams, load_profile
from kvflow.kv.blocks import RegionBlockIO
from kvflow.kv.connector import EngineKv, KvConnector
from kvflow.kv.layout import KvLayout
from kvflow.kv.shm import SharedRegion, shm_available
from kvflow.llm.kv_events import CacheSnapshot, LoadMetrics
from kvflow.llm.protocol import FINISH_CANCELLED, EngineOutput, PreprocessedRequest
from kvflow.runtime.context import Context

log = logging.getLogger(__name__)

LOAD_INTERVAL_S = 0.05


def mocker_kv_layout(config: MockerConfig) -> KvLayout:
    """The mocker's transferable KV: one byte per token for keys and one for values."""
    return KvLayout(num_layers=1, block_size=config.block_size, num_kv_heads=1, head_dim=1,
                    dtype="uint8", device="sim", num_slots=config.num_gpu_blocks)


class MockerEngine:
    """A simulated LLM engine implementing kvflow.engines.base.Engine."""

    def __init__(self, config: MockerConfig, hooks: EngineHooks | None = None,
                 object_store: SharedSimStore | None = None) -> None:
        self.config = config
        self.hooks = hooks or EngineHooks()
        params = load_profile(config.profile) if config.profile else TimingParams()
        self.timing = TimingModel(params)
        self.pool = BlockPool(
            config.num_gpu_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            worker_id=self.hooks.worker_id,
        )
        self.sim = make_sim_tiers(config, params, object_store)
        self.host = HostTier(config.num_host_blocks) if config.num_host_blocks and not self.sim else None
        args = (config.block_size, params.kv_bytes_per_token, self.host, config.host_bandwidth)
        tiered = TieredMockerConnector(self.sim, *args) if self.sim is not None else None
        self.connector: KvConnector = tiered or MockerConnector(*args)
        self._wakeup = asyncio.Event()
        self.kv_memory: SharedRegion | None = None
        if self.hooks.make_connector is not None:
            self.connector = self.hooks.make_connector(self._engine_kv(params.kv_bytes_per_token))
        self.scheduler = Scheduler(config.scheduler_config(), self.pool, self.connector)
        if tiered is not None and self.sim is not None:
            self.sim.record_event = self.pool.record_event
            tiered.wake = self._wake
            tiered.speedup_ratio = config.speedup_ratio
        self.output = make_output(config.output, config.vocab_size)
        self._streams: dict[str, OutputStream] = {}
        self._task: asyncio.Task[None] | None = None
        self._failure: str | None = None
        self._last_load: LoadMetrics | None = None
        self._last_load_at = float("-inf")

    def _wake(self) -> None:
        self._wakeup.set()

    def _engine_kv(self, kv_bytes_per_token: float) -> EngineKv:
        """Sized blocks for transfers (2 bytes per token), in /dev/shm when it is there."""
        layout = mocker_kv_layout(self.config)
        region: memoryview
        if shm_available():
            self.kv_memory = SharedRegion.create(layout.region_bytes)
            region = self.kv_memory.view
        else:
            region = memoryview(bytearray(layout.region_bytes))
        seconds_per_token = kv_bytes_per_token / self.config.kv_transfer_bandwidth
        speedup = self.config.speedup_ratio
        return EngineKv(
            RegionBlockIO(layout, region),
            self.kv_memory.name if self.kv_memory is not None else None,
            wake=self._wakeup.set,
            modelled_s=lambda n: n * seconds_per_token / speedup if speedup else 0.0,
            fallback=self.connector,
        )

    # ---- Engine contract ----------------------------------------------------------

    async def start(self) -> None:
        assert self._task is None, "MockerEngine.start() called twice"
        self._task = asyncio.create_task(self._run(), name=f"mocker-{self.hooks.worker_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._failure = "the mocker engine stopped; retry the request on another worker"
        self._fail_all(self._failure)
        if self.kv_memory is not None:
            self.kv_memory.close()

    def cache_snapshot(self) -> CacheSnapshot:
        return self.pool.snapshot()

    def generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        stream = self._open(request)
        return follow_outputs(stream, functools.partial(self._cancel, stream), context)

    # ---- requests -----------------------------------------------------------------

    def _open(self, request: PreprocessedRequest) -> OutputStream:
        seq = self._make_sequence(request)
        stream = OutputStream(seq, request.sampling.logprobs)
        if self._failure is not None:
            stream.fail(self._failure)
            return stream
        try:
            self.scheduler.add(seq)
        except RequestRejected as exc:
            stream.fail(str(exc))
            return stream
        self._streams[seq.request_id] = stream
        self.scheduler.prefetch(seq)  # a tier hit starts loading during the step in progress
        self._wakeup.set()
        return stream

    def _make_sequence(self, request: PreprocessedRequest) -> Sequence:
        seq = Sequence.from_request(request, seed=sequence_seed(request, self.config.seed))
        prior = min(max(request.prior_output_tokens, 0), seq.num_tokens - 1)
        if prior:  # a migrated request continues at its output position, with its limits
            seq.prompt_len -= prior
            stop = seq.stop
            seq.stop = dataclasses.replace(
                stop, min_tokens=stop.min_tokens + prior,
                max_tokens=None if stop.max_tokens is None else stop.max_tokens + prior)
        return seq

    def _cancel(self, stream: OutputStream) -> None:
        """End `stream` as cancelled and free its blocks now (no-op once it has ended)."""
        if stream.finished:
            return
        request_id = stream.seq.request_id
        self._close(request_id)
        if self.scheduler.requests.get(request_id) is stream.seq:
            self.scheduler.abort(request_id)
        stream.finish(FINISH_CANCELLED)

    def _close(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _fail_all(self, message: str) -> None:
        for request_id, stream in list(self._streams.items()):
            self.scheduler.abort(request_id)
            self._close(request_id)
            stream.fail(message)

    # ---- the loop -----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.scheduler.has_work():
                    self._publish_load(loop.time(), force=True)
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                await self.step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("mocker engine %s failed", self.hooks.worker_id)
            self._failure = f"the mocker engine failed ({exc!r}); see the worker log"
            self._fail_all(self._failure)

    async def step(self) -> None:
        """One iteration: schedule, simulate the model, update, publish."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        out = self.scheduler.schedule()
        await self._simulate(out, started)
        finished = self.scheduler.update(self._sample(out))
        self._deliver(out, finished)
        self._publish_events()
        self._publish_load(loop.time())

    async def _simulate(self, out: SchedulerOutput, started: float) -> None:
        if self.config.speedup_ratio == 0:
            await asyncio.sleep(0)
            return
        duration = self.timing.step_time(out) / self.config.speedup_ratio
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, started + duration - loop.time()))

    def _sample(self, out: SchedulerOutput) -> dict[str, list[int]]:
        next_token = self.output.next_token
        return {
            s.seq.request_id: [next_token(s.seq)]
            for s in out.scheduled
            if s.samples and self.scheduler.requests.get(s.seq.request_id) is s.seq
        }

    def _deliver(self, out: SchedulerOutput, finished: list[FinishedSeq]) -> None:
        streams = self._streams
        for s in out.scheduled:
            stream = streams.get(s.seq.request_id) if s.samples else None
            if stream is not None and stream.seq is s.seq:
                stream.take_new_tokens()
        for f in finished:
            stream = streams.get(f.seq.request_id)
            if stream is not None and stream.seq is f.seq:
                self._close(f.seq.request_id)
                stream.finish(f.reason)

    # ---- publishing ---------------------------------------------------------------

    def _publish_events(self) -> None:
        events = self.pool.drain_events()
        if not events:
            return
        if self.host is not None:
            self.host.observe(events)
        self.hooks.publish_kv_events(events)

    def _publish_load(self, now: float, force: bool = False) -> None:
        if not force and now - self._last_load_at < LOAD_INTERVAL_S:
            return
        self._last_load_at = now
        metrics = self.load_metrics()
        if metrics != self._last_load:
            self._last_load = metrics
            self.hooks.publish_load(metrics)

    def load_metrics(self) -> LoadMetrics:
        metrics = self.scheduler.load_metrics()
        if self.host is not None:
            metrics.host_active_blocks = self.host.num_used
            metrics.host_total_blocks = self.host.num_blocks
        if self.sim is not None:
            metrics.tier_block_s = self.sim.costs()
            metrics.host_active_blocks = self.sim.blocks_held("host")
            metrics.host_total_blocks = self.config.num_host_blocks
        return metrics

