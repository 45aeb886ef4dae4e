"""The model runner: loads the model, sizes the KV cache, captures graphs, and executes steps.

`execute(scheduled)` is the middle of the engine loop: build the batch tensors, run the
model (a CUDA graph for decode batches), sample, and return the new tokens per request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from kvflow.engines.core.scheduler import ScheduledSeq
from kvflow.engines.native.attention import AttentionMetadata, make_backend
from kvflow.engines.native.config import ModelConfig, NativeEngineConfig
from kvflow.engines.native.cuda_graphs import DecodeGraphs, GraphStep
from kvflow.engines.native.inputs import StepInputs, build_inputs
from kvflow.engines.native.kv_cache import (
    KvCacheLayout,
    allocate_kv_cache,
    cpu_num_blocks,
    gpu_num_blocks,
)
from kvflow.engines.native.model import CausalLM
from kvflow.engines.native.ops import make_ops
from kvflow.engines.native.sampler import RequestSampling, Sampler, SamplerOutput, SampleRow
from kvflow.engines.native.weights import (
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
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
        self.layout = self._size_cache()
        self.kv_caches = allocate_kv_cache(self.layout, device)
        model.set_kv_caches(self.kv_caches)
        self.graphs = self._capture_graphs()

    @classmethod
    def load(cls, engine: NativeEngineConfig) -> ModelRunner:
        model_dir = resolve_model_dir(engine.model_path)
        cfg = ModelConfig.from_dir(model_dir)
        device = resolve_device(engine.device)
        dtype = resolve_dtype(engine.dtype, cfg)
        max_len = min(engine.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        torch.manual_seed(engine.seed)
        backend = make_backend(engine.attention_backend, device)
        ops = make_ops(engine.ops, device)
        model = load_model(model_dir, cfg, backend, max_len, device, dtype, ops)
        return cls(model, engine, device, dtype, max_len)

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    # ---- setup --------------------------------------------------------------------

    def _size_cache(self) -> KvCacheLayout:
        if self.device.type == "cuda":
            num_blocks = gpu_num_blocks(self.cfg, self.engine, self.dtype, self._profile())
        else:
            num_blocks = cpu_num_blocks(self.cfg, self.engine, self.dtype)
        layout = KvCacheLayout(num_blocks, self.block_size, self.cfg.num_layers,
                               self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype)
        log.info("native engine: %d KV blocks of %d tokens", num_blocks, self.block_size)
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
        sizes = tuple(s for s in self.engine.cuda_graph_batch_sizes if s <= self.engine.max_num_seqs)
        if not sizes:
            return None
        graphs = DecodeGraphs(self.model, self.layout, cdiv(self.max_model_len, self.block_size),
                              sizes, self.device)
        with torch.inference_mode():
            graphs.capture()
        return graphs

    # ---- one step -----------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledSeq], sampling: Mapping[str, RequestSampling]
    ) -> StepResult:
        """Build the batch, run the model, sample: the new token of every sampling sequence."""
        inputs = self.prepare(scheduled)
        logits = self.logits(inputs)
        return self.sample(inputs, logits, sampling)

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs | GraphStep:
        """Decode steps a captured graph can run are staged into its inputs; others get tensors."""
        if self.graphs is not None and self.graphs.accepts(scheduled):
            return self.graphs.stage(scheduled)
        return build_inputs(scheduled, self.block_size, self.device)

    @torch.inference_mode()
    def sample(
        self, inputs: StepInputs | GraphStep, logits: torch.Tensor,
        sampling: Mapping[str, RequestSampling],
    ) -> StepResult:
        if not inputs.sampling_seqs:
            return StepResult({}, {})
        rows = [_sample_row(s, sampling) for s in inputs.sampling_seqs]
        out = self.sampler(logits, rows)
        ids = [s.seq.request_id for s in inputs.sampling_seqs]
        sampled = {rid: [tok] for rid, tok in zip(ids, out.token_ids, strict=True)}
        return StepResult(sampled, _logprobs_by_request(ids, out))

    @torch.inference_mode()
    def logits(self, inputs: StepInputs | GraphStep) -> torch.Tensor:
        """Logits [S, V] (float32) of the rows that sample."""
        if isinstance(inputs, GraphStep):
            assert self.graphs is not None
            return self.graphs.replay(inputs)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_indices])


def _sample_row(s: ScheduledSeq, sampling: Mapping[str, RequestSampling]) -> SampleRow:
    seq = s.seq
    params = sampling.get(seq.request_id) or _DEFAULT_SAMPLING
    if not params.penalized:  # token lists are only read by penalties
        return SampleRow(params, [], [], seq.num_output_tokens)
    return SampleRow(params, seq.token_ids[: seq.prompt_len], seq.output_token_ids,
                     seq.num_output_tokens)


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


def single_prefill_meta(tokens: int, block_size: int, device: torch.device) -> AttentionMetadata:
    blocks = cdiv(tokens, block_size)
    return AttentionMetadata(
        slot_mapping=torch.arange(tokens, device=device),
        query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None, :],
        max_query_len=tokens, max_seq_len=tokens,
        query_start_host=[0, tokens], seq_lens_host=[tokens],
    )


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
