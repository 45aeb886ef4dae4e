"""VllmEngine: vLLM's AsyncLLM as a kvflow engine (imported only inside a worker, in a venv with vLLM).

vLLM's own arguments come after `--` on `kvflow worker`'s command line and are
parsed by vLLM's parser. The adapter turns on vLLM's ZMQ KV-event publisher on
a private ipc endpoint (unless the user configured one), relays its events with
kvflow block hashes, and publishes load from vLLM's scheduler stats.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

from vllm import SamplingParams
from vllm.config.kv_events import KVEventsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from kvflow.engines.adapter import EngineAdapter, EngineInfo
from kvflow.engines.base import EngineHooks
from kvflow.engines.vllm.events import EventTranslator, ZmqEventRelay
from kvflow.engines.vllm.sampling import finish_reason, sampling_kwargs
from kvflow.llm.kv_events import CacheSnapshot, LoadMetrics
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.runtime.context import Context


def engine_args(model_path: str, vllm_argv: list[str], events_dir: str) -> AsyncEngineArgs:
    """vLLM's engine args from its own CLI flags, with KV events on a private ipc endpoint by default."""
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="kvflow worker --engine vllm --"))
    ns = parser.parse_args(["--model", model_path, *vllm_argv])
    args = AsyncEngineArgs.from_cli_args(ns)
    if args.kv_events_config is None:
        args.kv_events_config = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=f"ipc://{events_dir}/kv-events",
        )
    args.enable_prefix_caching = True
    args.disable_log_stats = True  # our stat logger below still receives the stats
    return args


def subscriber_endpoint(endpoint: str) -> str:
    """Where to connect to a publisher bound at `endpoint` (wildcards mean this host)."""
    return endpoint.replace("*", "127.0.0.1")


class VllmEngine(EngineAdapter):
    """One vLLM AsyncLLM per worker instance."""

    def __init__(self, hooks: EngineHooks, args: AsyncEngineArgs, events_dir: str) -> None:
        super().__init__(hooks)
        self.args = args
        self.events_dir = events_dir
        self.llm: AsyncLLM | None = None
        self.relay: ZmqEventRelay | None = None
        self.translator: EventTranslator | None = None

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        from kvflow.engines.vllm import add_vllm_args

        add_vllm_args(parser)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, hooks: EngineHooks) -> VllmEngine:
        events_dir = tempfile.mkdtemp(prefix="kvflow-vllm-")
        return cls(hooks, engine_args(ns.model_path, list(ns.vllm_args), events_dir), events_dir)

    async def start_engine(self) -> EngineInfo:
        self.llm = AsyncLLM.from_engine_args(self.args, stat_loggers=[self._stat_logger_factory()])
        config = self.llm.vllm_config
        block = config.cache_config.block_size
        events = self.args.kv_events_config
        self.translator = translator = EventTranslator(self.hooks.worker_id, block)
        self.relay = ZmqEventRelay(subscriber_endpoint(events.endpoint), translator,
                                   self.hooks.publish_kv_events)
        self.relay.start()
        return EngineInfo(
            context_length=config.model_config.max_model_len, kv_block_size=block,
            total_kv_blocks=config.cache_config.num_gpu_blocks or 0,
            max_batch=config.scheduler_config.max_num_seqs,
            publishes_kv_events=bool(events.enable_kv_cache_events),
        )

    def _stat_logger_factory(self) -> Any:
        engine = self

        class LoadLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.config = vllm_config

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kw: Any) -> None:
                if scheduler_stats is not None:
                    engine.publish_load(scheduler_stats, self.config.cache_config.num_gpu_blocks or 0)

            def log_engine_initialized(self) -> None:
                return None

        return LoadLogger

    def publish_load(self, stats: Any, total_blocks: int) -> None:
        self.hooks.publish_load(LoadMetrics(
            self.hooks.worker_id, active_blocks=round(stats.kv_cache_usage * total_blocks),
            total_blocks=total_blocks, num_waiting=stats.num_waiting_reqs,
            num_running=stats.num_running_reqs,
        ))

    async def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]:
        assert self.llm is not None and self.info is not None, "generate() before start()"
        params = SamplingParams(**sampling_kwargs(request, self.info.context_length),
                                output_kind=RequestOutputKind.DELTA)
        first = True
        prompt = {"prompt_token_ids": list(request.token_ids)}
        async for out in self.llm.generate(prompt, params, request.request_id):
            for choice in out.outputs:
                yield EngineOutput(
                    list(choice.token_ids), finish_reason=finish_reason(choice.finish_reason),
                    cached_tokens=(out.num_cached_tokens or 0) if first else None, index=choice.index,
                )
            first = False

    def cache_snapshot(self) -> CacheSnapshot | None:
        return self.translator.snapshot() if self.translator is not None else None

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    async def health(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def events_hint(self) -> str:
        return ("vLLM's KV event publisher did not reach the relay: check --kv-events-config "
                "(enable_kv_cache_events, publisher=zmq, endpoint) and that prefix caching is on")

    async def cleanup(self) -> None:
        if self.relay is not None:
            await self.relay.close()
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        shutil.rmtree(self.events_dir, ignore_errors=True)
