"""The native PyTorch engine, registered as "native"; this module imports no torch.

- config.py: NativeEngineConfig (engine knobs) and ModelConfig (config.json).
- weights.py: model dir / hub id, safetensors reading, building the model on a device.
- layers.py, model.py: Llama / Mistral / Qwen2 / Qwen3 in plain PyTorch; checkpoint name map.
- attention.py: per-step attention layout, backend registry, gather backend (any device).
- ops.py, triton_ops.py: norms, rope, SwiGLU, projections by name (torch / fused Triton).
- triton_gemv.py: decode GEMVs with the input norm or activation folded in (GPU);
  triton_gemv_parts.py what its kernels share; triton_gemv_tma.py the FP8 one-row GEMV fed
  by the tensor memory accelerator (Hopper).
- triton_attention.py: the Triton attention backend, paged prefill kernels, cuDNN for one
  long fresh prompt (GPU).
- triton_decode.py: fused decode attention: rope + K/V store + split-KV + merge in one launch.
- triton_pdl.py: programmatic dependent launch for the decode kernels (Hopper).
- kv_cache.py: KV cache sizing and allocation.
- inputs.py: scheduler output -> batch tensors.
- sampler.py: batched sampling, penalties, seeds, logprobs.
- cuda_graphs.py: captured decode graphs (forward, logits, argmax), inputs staged in one upload.
- runner.py: ModelRunner: prepare / launch / collect a step; sampled ids stay on the device.
- parallel.py: tensor parallelism: process group, sharded weights, all-reduce hooks, step broadcast.
- tp_ranks.py: rank 0 starts, watches and stops ranks 1..N-1 (and their process's main).
- stream.py, engine.py: NativeEngine, the threaded schedule -> execute -> update loop
  (async output: step k+1 launches before step k's tokens reach the host).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from kvflow.engines.base import EngineHooks, EngineSpec, register_engine
from kvflow.engines.native.config import DTYPES, NativeEngineConfig
from kvflow.kv.tiers.config import add_tier_args, tier_config_from_args
from kvflow.runtime.errors import needs_extra

if TYPE_CHECKING:
    from kvflow.engines.native.engine import NativeEngine

__all__ = ["NativeEngineConfig", "add_native_args", "config_from_args"]

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NativeEngineConfig)}


def add_native_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("native engine")  # --model-path belongs to the worker
    g.add_argument("--dtype", default=_DEFAULTS["dtype"], choices=[*DTYPES, "bf16", "fp16", "fp32"],
                   help="weights and activations dtype (auto: the checkpoint's, float32 on CPU)")
    g.add_argument("--device", default=_DEFAULTS["device"], help="auto, cpu, cuda, cuda:N")
    g.add_argument("--block-size", type=int, default=_DEFAULTS["block_size"],
                   help="tokens per KV block")
    g.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV blocks to allocate (default: sized from memory)")
    g.add_argument("--gpu-memory-utilization", type=float,
                   default=_DEFAULTS["gpu_memory_utilization"],
                   help="fraction of GPU memory for weights, activations and KV cache")
    g.add_argument("--cpu-kv-cache-gb", type=float, default=_DEFAULTS["cpu_kv_cache_gb"],
                   help="KV cache size on CPU when --num-gpu-blocks is not given")
    g.add_argument("--max-num-seqs", type=int, default=_DEFAULTS["max_num_seqs"],
                   help="most sequences running at once")
    g.add_argument("--max-num-batched-tokens", type=int,
                   default=_DEFAULTS["max_num_batched_tokens"],
                   help="token budget per step (prefill chunk size)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's max_position_embeddings)")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--seed", type=int, default=_DEFAULTS["seed"], help="seed of the sampler")
    g.add_argument("--tensor-parallel-size", type=int, default=_DEFAULTS["tensor_parallel_size"],
                   help="processes (GPUs) to split the model's heads and MLP over")
    g.add_argument("--batch-invariant", action="store_true",
                   help="same tokens for a prompt whatever else is batched or however it is chunked "
                   "(slower: kernels whose sums do not depend on the batch)")
    g.add_argument("--stream-interval", type=int, default=_DEFAULTS["stream_interval"],
                   help="tokens a stream gathers per output after the first (less host work "
                        "per step at large batches, burstier streams)")
    add_tier_args(parser)


def config_from_args(ns: argparse.Namespace) -> NativeEngineConfig:
    if not ns.model_path:
        raise ValueError("the native engine needs --model-path (a model directory or hub id)")
    return NativeEngineConfig(
        model_path=ns.model_path,
        dtype=ns.dtype,
        device=ns.device,
        block_size=ns.block_size,
        num_gpu_blocks=ns.num_gpu_blocks,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        cpu_kv_cache_gb=ns.cpu_kv_cache_gb,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_model_len=ns.max_model_len,
        enforce_eager=ns.enforce_eager,
        seed=ns.seed,
        tensor_parallel_size=ns.tensor_parallel_size,
        batch_invariant=ns.batch_invariant,
        stream_interval=ns.stream_interval,
        tiers=tier_config_from_args(ns),
    )


def _build(ns: argparse.Namespace, hooks: EngineHooks) -> NativeEngine:
    with needs_extra("the native engine", "torch"):
        from kvflow.engines.native.engine import NativeEngine  # torch is imported here, lazily

    return NativeEngine(config_from_args(ns), hooks)


def _card_overrides(ns: argparse.Namespace) -> dict:
    from kvflow.llm.structured import available

    return {"kv_cache_block_size": ns.block_size, "guided_decoding": available(),
            "embeddings": True}


SPEC = register_engine(
    EngineSpec(name="native", add_args=add_native_args, build=_build, card_overrides=_card_overrides,
    kv_events=lambda ns: True)
)
