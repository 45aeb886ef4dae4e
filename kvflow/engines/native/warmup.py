"""Startup warm-up: run every step shape serving can hit once, so no request waits for a compile.

Triton compiles a kernel the first time it meets a new specialisation (tiling, row-count
path, split count), and cuBLAS / CUDA load their kernels lazily; either can cost a request
up to a second. `warm_up` runs, before the engine takes requests, prefill chunks of every
size class the ops and attention pick kernels by (one row, a few rows, the short and the long
attention tilings, the full step budget) and eager decode steps at the batch sizes CUDA graphs
do not cover, then logits and a softmax. It returns what it ran and how long it took.
`warm_attention` lets the attention backend build its shape-keyed plans (cuDNN's, for long
prompts); PyTorch keeps those per thread, so the engine calls it on its own thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from kvflow.engines.native.attention import (
    AttentionMetadata,
    single_prefill_meta,
    uniform_decode_meta,
)
from kvflow.engines.native.model import CausalLM


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up ran, for the startup log."""

    prefill_lengths: tuple[int, ...]
    decode_batches: tuple[int, ...]
    seconds: float
    serving_steps: int = 0

    def describe(self) -> str:
        return (f"warmed prefill chunks {list(self.prefill_lengths)}, eager decode batches "
                f"{list(self.decode_batches)} and {self.serving_steps} steps of short requests "
                f"in {self.seconds:.1f}s")


def prefill_lengths(max_tokens: int) -> tuple[int, ...]:
    """One row, a few rows (GEMV paths), each attention tiling (it switches at 64 and 1024
    rows), the budget."""
    sizes = {1, 2, 8, 16, 64, 65, 256, 1024, max_tokens}
    return tuple(sorted(s for s in sizes if s <= max_tokens))


def warm_up(
    model: CausalLM, block_size: int, num_blocks: int, max_tokens: int,
    decode_batches: tuple[int, ...], device: torch.device,
) -> WarmUp:
    """Run each shape once (on free KV blocks: nothing is cached yet) and synchronise."""
    start = time.perf_counter()
    capacity = num_blocks * block_size
    lengths = tuple(n for n in prefill_lengths(max_tokens) if n <= capacity)
    with torch.inference_mode():
        for n in lengths:
            _step(model, single_prefill_meta(n, block_size, device), torch.arange(n, device=device))
        batches = tuple(b for b in decode_batches if b * 2 * block_size <= capacity)
        for b in batches:
            context = 2 * block_size - 1
            meta = uniform_decode_meta(b, context, block_size, device)
            _step(model, meta, torch.full((b,), context, device=device))
        # async output's id chaining (one kernel for every step size)
        ids = torch.zeros(4, dtype=torch.int64, device=device)
        model.ops.chain_ids(ids, torch.tensor([0, -1, 1, -1], device=device), ids.clone())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return WarmUp(lengths, batches, time.perf_counter() - start)


def warm_attention(model: CausalLM, max_tokens: int) -> tuple[int, ...]:
    """The attention backend's shape-keyed plans for steps of up to `max_tokens` rows, built
    on the calling thread; returns the prompt lengths prepared."""
    attn = model.layers[0].self_attn
    dtype = model.embed_tokens.weight.dtype
    with torch.inference_mode():
        return attn.backend.warm_up(max_tokens, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                    dtype, model.embed_tokens.weight.device)


def _step(model: CausalLM, meta: AttentionMetadata, positions: torch.Tensor) -> None:
    """One step as the runner runs it: the last layer keeps the sampling rows alone unless
    every row samples."""
    ids = torch.full_like(positions, 3)
    rows = meta.query_start_loc[1:].long() - 1
    if rows.shape[0] == positions.shape[0]:
        hidden = model(ids, positions, meta)[rows]
    else:
        hidden = model(ids, positions, meta, keep=rows)
    torch.softmax(model.compute_logits(hidden), dim=-1).argmax(dim=-1)


def warm_serving_path(runner: Any) -> int:
    """Short requests through the runner's own step path (inputs, model, sampler, readback) on a
    private scheduler and block pool, so nothing reaches the prefix cache or its events:
    greedy, sampled with top-k/top-p and logprobs, penalised; prompts of 1 to 300 tokens,
    together, so steps mix prefill and decode; then prompts of 1 to 1000 tokens one at a time
    (a lone prompt's tile count and block-table width differ). Returns the steps run."""
    from kvflow.engines.core import BlockPool, Scheduler, SchedulerConfig, Sequence, StopRule
    from kvflow.engines.native.sampler import RequestSampling

    engine = runner.engine
    pool = BlockPool(runner.num_blocks, runner.block_size)
    sched = Scheduler(SchedulerConfig(
        max_num_seqs=engine.max_num_seqs, max_num_batched_tokens=engine.max_num_batched_tokens,
        block_size=runner.block_size, max_model_len=runner.max_model_len), pool)
    variants = {
        "greedy": RequestSampling(temperature=0.0),
        "sampled": RequestSampling(temperature=0.8, top_p=0.9, top_k=20, logprobs=2),
        "penalized": RequestSampling(temperature=0.0, repetition_penalty=1.1),
    }
    sampling: dict[str, RequestSampling] = {}
    mixed = [n for n in (1, 17, 300) if n + 3 <= runner.max_model_len]
    alone = [n for n in (1, 17, 64, 65, 300, 512, 1000) if n + 3 <= runner.max_model_len]
    rounds = [[(name, n) for name in variants for n in mixed]]
    rounds += [[("greedy", n)] for n in alone]  # one prompt alone: its own tile and table shapes
    steps = 0
    with torch.inference_mode():
        for k, requests in enumerate(rounds):
            for name, n in requests:
                rid = f"warm-{k}-{name}-{n}"
                sampling[rid] = variants[name]
                sched.add(Sequence(rid, [3] * n, StopRule(max_tokens=3, ignore_eos=True)))
            while sched.has_work():
                out = sched.schedule()
                sched.update(runner.execute(out.scheduled, sampling).sampled)
                steps += 1
    return steps
