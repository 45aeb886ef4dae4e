"""The model runner: loads the model, sizes the KV cache, captures graphs, and executes steps.

A step is `prepare` (stage the inputs: host work, under the scheduler's lock), `launch`
(queue the model, a CUDA graph for decode batches, and sampling on the device) and
`collect` (wait for the sampled tokens on the host); `execute` is the three in a row.
Between `launch` and `collect` of one step the engine may prepare and launch the next:
every step's sampled ids stay in `sampled` on the device, where the next step's inputs
take the tokens the host has not seen yet (async output).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from kvflow.engines.core.scheduler import ScheduledSeq
from kvflow.engines.core.sequence import Sequence
from kvflow.engines.native.attention import make_backend, single_prefill_meta
from kvflow.engines.native.config import ModelConfig, NativeEngineConfig
from kvflow.engines.native.cuda_graphs import DecodeGraphs, GraphStep
from kvflow.engines.native.inputs import StepInputs, build_inputs
from kvflow.engines.native.kv_cache import (
    KvCacheLayout,
    allocate_kv_cache,
    allocate_kv_memory,
    bytes_per_block,
    cpu_num_blocks,
    gpu_num_blocks,
)
from kvflow.engines.native.kv_io import block_io, kv_layout
from kvflow.engines.native.model import CausalLM
from kvflow.engines.native.ops import make_ops
from kvflow.engines.native.parallel import agree_num_blocks, load_local_model
from kvflow.engines.native.pooling import Pooler
from kvflow.engines.native.sampler import RequestSampling, Sampler, SamplerOutput, SampleRow
from kvflow.engines.native.warmup import warm_attention, warm_serving_path, warm_up
from kvflow.engines.native.weights import (
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from kvflow.kv.blocks import KvBlockIO
from kvflow.llm.protocol import TopLogprob

log = logging.getLogger(__name__)


@dataclass
class TokenLogprobs:
    """The sampled token's logprob and, if asked, the top alternatives."""

    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class StepResult:
    sampled: dict[str, list[int]]
    logprobs: dict[str, TokenLogprobs]
    embeddings: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class PendingTokens:
    """Sampled ids on their way to the host; `wait()` returns them."""

    host: torch.Tensor
    ready: torch.cuda.Event | None = None

    def wait(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class TokenReadback:
    """Copies sampled ids to pinned host memory without blocking. Two buffers: one step's
    ids are read while the next step's copy is already queued."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(size, dtype=torch.int64, pin_memory=self.cuda)
                        for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else []
        self.turn = 0

    def fetch(self, ids: torch.Tensor) -> PendingTokens:
        if not self.cuda:
            return PendingTokens(ids.clone())
        i, self.turn = self.turn, 1 - self.turn
        host = self.buffers[i][: ids.numel()]
        host.copy_(ids, non_blocking=True)
        self.events[i].record()
        return PendingTokens(host, self.events[i])


@dataclass
class Launched:
    """A step queued on the device: the rows that sample, and their tokens (pending, or
    already on the host when the step needed them there, e.g. for logprobs)."""

    seqs: list[ScheduledSeq]
    tokens: PendingTokens | None = None
    result: StepResult | None = None
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    """Owns the model, its KV cache and the sampler on one device."""

    def __init__(
        self, model: CausalLM, engine: NativeEngineConfig, device: torch.device,
        dtype: torch.dtype, max_model_len: int,
    ) -> None:
        self.model, self.engine, self.device, self.dtype = model, engine, device, dtype
        self.cfg: ModelConfig = model.cfg
        self.block_size = engine.block_size
        self.max_model_len = max_model_len
        self.sampler = Sampler(device, engine.seed)
        self.pooler = Pooler()
        self._hidden: torch.Tensor | None = None
        self.sampled = torch.zeros(engine.max_num_seqs, dtype=torch.int64, device=device)
        self.readback = TokenReadback(engine.max_num_seqs, device)
        self._rows: dict[Sequence, int] = {}  # sampling row of each sequence, last launch
        self.layout = self._size_cache()
        self.kv_memory = allocate_kv_memory(self.layout, device, engine.shared_kv)
        self.kv_caches = list(self.kv_memory.whole.unbind(0))
        model.set_kv_caches(self.kv_caches)
        self.graphs = self._capture_graphs()
        self._warm_up()

    @classmethod
    def load(cls, engine: NativeEngineConfig) -> ModelRunner:
        model_dir = resolve_model_dir(engine.model_path)
        cfg = ModelConfig.from_dir(model_dir)
        device = resolve_device(engine.device)
        dtype = resolve_dtype(engine.dtype, cfg)
        max_len = min(engine.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        torch.manual_seed(engine.seed)
        backend_name, ops_name = engine.kernels
        backend = make_backend(backend_name, device)
        ops = make_ops(ops_name, device)
        log.info("native engine: loading %s (%s, %d layers) on %s as %s", model_dir,
                 cfg.arch, cfg.num_layers, device, str(dtype).removeprefix("torch."))
        started = time.monotonic()
        model = load_local_model(model_dir, cfg, backend, max_len, device, dtype, ops,
                                 engine.tensor_parallel_size)
        params = sum(p.numel() for p in model.parameters())
        log.info("native engine: weights loaded in %.1f s (%.1fM parameters)",
                 time.monotonic() - started, params / 1e6)
        return cls(model, engine, device, dtype, max_len)

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def block_io(self) -> KvBlockIO:
        """The KV cache as blocks a transfer agent can read and write (kvflow.kv)."""
        return block_io(kv_layout(self.layout, self.device), self.kv_memory.whole)

    def shared_region_name(self) -> str | None:
        region = self.kv_memory.region
        return region.name if region is not None else None

    # ---- setup --------------------------------------------------------------------

    def _size_cache(self) -> KvCacheLayout:
        if self.device.type == "cuda":
            num_blocks = gpu_num_blocks(self.cfg, self.engine, self.dtype, self._profile())
        else:
            num_blocks = cpu_num_blocks(self.cfg, self.engine, self.dtype, self.max_model_len)
        num_blocks = agree_num_blocks(num_blocks, self.device, self.engine.tensor_parallel_size)
        layout = KvCacheLayout(num_blocks, self.block_size, self.cfg.num_layers,
                               self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype)
        size = (num_blocks + 1) * bytes_per_block(self.cfg, self.block_size, self.dtype) / 2**30
        log.info("native engine: KV cache of %d blocks x %d tokens (%d tokens, %.3f GiB) on %s",
                 num_blocks, self.block_size, num_blocks * self.block_size, size, self.device)
        return layout

    @torch.inference_mode()
    def _profile(self) -> int:
        """Peak activation bytes of the largest step (one full-budget prefill plus logits)."""
        tokens = min(self.engine.max_num_batched_tokens, self.max_model_len)
        scratch = KvCacheLayout(cdiv(tokens, self.block_size), self.block_size,
                                self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim,
                                self.dtype)
        self.model.set_kv_caches(allocate_kv_cache(scratch, self.device))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        meta = single_prefill_meta(tokens, self.block_size, self.device)
        ids = torch.zeros(tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, torch.arange(tokens, device=self.device), meta)
        rows = min(self.engine.max_num_seqs, tokens)
        logits = self.model.compute_logits(hidden[:rows])
        torch.softmax(logits, dim=-1).sort(dim=-1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del hidden, logits
        self.model.set_kv_caches([torch.empty(0)] * self.cfg.num_layers)
        torch.cuda.empty_cache()
        return peak + 2 * rows * self.cfg.vocab_size * 4  # sampler temporaries on top

    def _capture_graphs(self) -> DecodeGraphs | None:
        if self.device.type != "cuda" or self.engine.enforce_eager:
            return None
        attn = self.model.layers[0].self_attn
        if not attn.backend.graphable(attn.head_dim):
            log.info("native engine: decode steps run eager (the %s attention backend reads "
                     "host lengths, which a CUDA graph cannot)", self.engine.kernels[0])
            return None
        sizes = tuple(s for s in self.engine.cuda_graph_batch_sizes if s <= self.engine.max_num_seqs)
        if not sizes:
            return None
        graphs = DecodeGraphs(self.model, self.layout, cdiv(self.max_model_len, self.block_size),
                              sizes, self.device, self.sampled)
        with torch.inference_mode():
            graphs.capture()
        return graphs

    def _warm_up(self) -> None:
        """GPU: every prefill size class and the decode batches graphs leave eager (warmup.py)."""
        if self.device.type != "cuda":
            return
        graphed = set(self.graphs.sizes) if self.graphs is not None else set()
        eager = {1, self.engine.max_num_seqs} - graphed
        done = warm_up(self.model, self.block_size, self.num_blocks,
                       min(self.engine.max_num_batched_tokens, self.max_model_len),
                       tuple(sorted(eager)), self.device)
        start = time.perf_counter()
        steps = warm_serving_path(self)
        torch.cuda.synchronize()
        done = dataclasses.replace(done, serving_steps=steps,
                                   seconds=done.seconds + time.perf_counter() - start)
        log.info("native engine: %s", done.describe())

    def warm_attention(self) -> tuple[int, ...]:
        """GPU: the attention backend's per-shape plans (cuDNN's, for long prompts), built on
        the calling thread, which must be the one that runs the steps (warmup.py)."""
        if self.device.type != "cuda":
            return ()
        return warm_attention(self.model, min(self.engine.max_num_batched_tokens, self.max_model_len))

    # ---- one step -----------------------------------------------------------------

    def execute(
        self, scheduled: list[ScheduledSeq], sampling: Mapping[str, RequestSampling]
    ) -> StepResult:
        """Build the batch, run the model, sample: the new token of every sampling sequence."""
        return self.collect(self.launch(self.prepare(scheduled), sampling))

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs | GraphStep:
        """Decode steps a captured graph can run are staged into its inputs; others get tensors.
        Reads the sequences' tokens and blocks: call it where they cannot change."""
        if self.graphs is not None and self.graphs.accepts(scheduled):
            return self.graphs.stage(scheduled, self._rows)
        return build_inputs(scheduled, self.block_size, self.device, self._rows)

    @torch.inference_mode()
    def launch(
        self, inputs: StepInputs | GraphStep, sampling: Mapping[str, RequestSampling],
        greedy_plain: bool = False,
    ) -> Launched:
        """Queue the model and sampling; the sampled ids land in `sampled` on the device.
        `greedy_plain`: the caller knows every request in `sampling` is greedy and plain (no
        penalties, grammar, min_tokens, logprobs or pooling), so a graph step needs nothing
        per row beyond the graph's own argmax."""
        if greedy_plain and isinstance(inputs, GraphStep):
            self.logits(inputs)
            seqs = inputs.sampling_seqs
            self._rows = {s.seq: i for i, s in enumerate(seqs)}
            return Launched(seqs, tokens=self.readback.fetch(self.sampled[: len(seqs)]))
        embedding = isinstance(inputs, StepInputs) and any(
            (p := sampling.get(s.seq.request_id)) is not None and p.embed is not None
            for s in inputs.scheduled)
        logits = self.logits(inputs, keep_hidden=True) if embedding else self.logits(inputs)
        embeddings = self._pool(inputs, sampling) if embedding else {}
        seqs = inputs.sampling_seqs
        self._rows = {s.seq: i for i, s in enumerate(seqs)}
        if not seqs:
            return Launched(seqs, result=StepResult({}, {}))
        rows = [_sample_row(s, sampling) for s in seqs]
        ids = self._sample(inputs, logits, rows)
        if any(r.params.logprobs is not None for r in rows):
            result = _result(seqs, self.sampler.collect(logits, ids, rows))
            result.embeddings = {rid: v.tolist() for rid, v in embeddings.items()}
            return Launched(seqs, result=result)
        return Launched(seqs, tokens=self.readback.fetch(ids), embeddings=embeddings)

    def _pool(self, inputs: StepInputs | GraphStep, sampling: Mapping[str, RequestSampling]
              ) -> dict[str, torch.Tensor]:
        """Feed each embedding request's rows of this step to the pooler; the requests whose
        prompt ends in this step get their embedding."""
        assert isinstance(inputs, StepInputs) and self._hidden is not None
        done: dict[str, torch.Tensor] = {}
        starts = inputs.meta.query_start_host
        for i, s in enumerate(inputs.scheduled):
            params = sampling.get(s.seq.request_id)
            if params is None or params.embed is None:
                continue
            rows = self._hidden[starts[i] : starts[i + 1]]
            vector = self.pooler.add(s.seq.request_id, rows, params.embed, final=s.samples)
            if vector is not None:
                done[s.seq.request_id] = vector
        self._hidden = None
        return done

    def _sample(self, inputs: StepInputs | GraphStep, logits: torch.Tensor,
                rows: list[SampleRow]) -> torch.Tensor:
        if isinstance(inputs, GraphStep) and all(r.params.greedy and r.params.plain for r in rows):
            return self.sampled[: len(rows)]  # the graph's own argmax
        ids = self.sampler.sample_ids(logits, rows)
        self.sampled[: len(rows)].copy_(ids)
        return ids

    def collect(self, launched: Launched) -> StepResult:
        """The step's sampled tokens on the host (waits for the device)."""
        if launched.result is not None:
            return launched.result
        assert launched.tokens is not None
        tokens = launched.tokens.wait()
        pairs = zip(launched.seqs, tokens, strict=True)
        embeddings = {rid: v.tolist() for rid, v in launched.embeddings.items()}
        return StepResult({s.seq.request_id: [t] for s, t in pairs}, {}, embeddings)

    @torch.inference_mode()
    def logits(self, inputs: StepInputs | GraphStep, keep_hidden: bool = False) -> torch.Tensor:
        """Logits [S, V] (float32) of the rows that sample (`keep_hidden`: the final hidden
        states of every row stay in `_hidden` for pooling)."""
        if isinstance(inputs, GraphStep):
            assert self.graphs is not None
            return self.graphs.replay(inputs)
        if inputs.chain_rows is not None:
            self.model.ops.chain_ids(inputs.input_ids, inputs.chain_rows, self.sampled)
        # The last layer projects only the sampling rows, unless every row samples (decode),
        # pooling reads every row, or other ranks run the forward without `keep`.
        keep = None if (keep_hidden or len(inputs.sampling_seqs) == inputs.num_tokens
                        or self.engine.tensor_parallel_size > 1) else inputs.logits_indices
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, keep=keep)
        if keep_hidden:
            self._hidden = hidden
        return self.model.compute_logits(hidden if keep is not None else hidden[inputs.logits_indices])


def _result(seqs: list[ScheduledSeq], out: SamplerOutput) -> StepResult:
    ids = [s.seq.request_id for s in seqs]
    sampled = {rid: [tok] for rid, tok in zip(ids, out.token_ids, strict=True)}
    return StepResult(sampled, _logprobs_by_request(ids, out))


def _sample_row(s: ScheduledSeq, sampling: Mapping[str, RequestSampling]) -> SampleRow:
    seq = s.seq
    params = sampling.get(seq.request_id) or _DEFAULT_SAMPLING
    num_output = s.start + s.num_new_tokens - seq.prompt_len  # before this row's token
    if not params.penalized:  # token lists are only read by penalties
        return SampleRow(params, [], [], num_output)
    return SampleRow(params, seq.token_ids[: seq.prompt_len], seq.output_token_ids, num_output)


_DEFAULT_SAMPLING = RequestSampling()


def _logprobs_by_request(ids: list[str], out: SamplerOutput) -> dict[str, TokenLogprobs]:
    if out.logprobs is None or out.top_ids is None or out.top_logprobs is None:
        return {}
    result: dict[str, TokenLogprobs] = {}
    for i, rid in enumerate(ids):
        if out.rows_with_logprobs[i]:
            top = [TopLogprob(t, lp) for t, lp in zip(out.top_ids[i], out.top_logprobs[i], strict=True)]
            result[rid] = TokenLogprobs(out.logprobs[i], top)
    return result


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
