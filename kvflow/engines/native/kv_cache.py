"""Sizing and allocating the paged KV cache: one [2, blocks, block_size, kv_heads, head_dim] tensor per layer.

One extra block past the pool's `num_blocks` is the padding block: rows added to fill a
CUDA-graph batch write their keys there, so they never touch a real sequence's cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvflow.engines.native.config import ModelConfig, NativeEngineConfig
from kvflow.kv.shm import SharedRegion, shm_available

_GIB = 1 << 30


@dataclass(frozen=True)
class KvCacheLayout:
    num_blocks: int  # usable blocks (the pool's); the padding block comes on top
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def pad_block(self) -> int:
        return self.num_blocks

    @property
    def pad_slot(self) -> int:
        return self.num_blocks * self.block_size


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def cpu_num_blocks(
    cfg: ModelConfig, engine: NativeEngineConfig, dtype: torch.dtype, max_model_len: int | None = None
) -> int:
    """--num-gpu-blocks if given, else as many blocks as --cpu-kv-cache-gb holds, but no more
    than every sequence at full length needs (a tiny model needs far less than 1 GB)."""
    if engine.num_gpu_blocks:
        return engine.num_gpu_blocks
    per_block = bytes_per_block(cfg, engine.block_size, dtype)
    fits = _at_least_one(int(engine.cpu_kv_cache_gb * _GIB) // per_block, "--cpu-kv-cache-gb")
    if max_model_len is None:
        return fits
    return min(fits, engine.max_num_seqs * -(-max_model_len // engine.block_size))


def gpu_num_blocks(
    cfg: ModelConfig, engine: NativeEngineConfig, dtype: torch.dtype, peak_activation_bytes: int
) -> int:
    """Blocks that fit in utilisation x total memory after weights, activations and others."""
    if engine.num_gpu_blocks:
        return engine.num_gpu_blocks
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    non_torch = (total - free) - reserved
    weights = torch.cuda.memory_allocated()
    budget = total * engine.gpu_memory_utilization - non_torch - weights - peak_activation_bytes
    per_block = bytes_per_block(cfg, engine.block_size, dtype)
    return _at_least_one(int(budget) // per_block, "--gpu-memory-utilization")


def _at_least_one(n: int, knob: str) -> int:
    if n < 1:
        raise RuntimeError(
            f"no memory is left for the KV cache; raise {knob} or set --num-gpu-blocks, "
            "or use a smaller model"
        )
    return n


def allocate_kv_cache(layout: KvCacheLayout, device: torch.device) -> list[torch.Tensor]:
    """Per-layer views of one allocation, padding block included (zeroed)."""
    return list(allocate_kv_memory(layout, device).whole.unbind(0))


@dataclass
class KvMemory:
    """The whole cache tensor, and the shared region it lives in (CPU, when asked)."""

    whole: torch.Tensor
    region: SharedRegion | None = None


def allocate_kv_memory(layout: KvCacheLayout, device: torch.device, shared: bool = False) -> KvMemory:
    """One zeroed `[layer, 2, slot, token, head, dim]` tensor; in /dev/shm if `shared` (CPU)."""
    shape = (
        layout.num_layers, 2, layout.num_blocks + 1, layout.block_size,
        layout.num_kv_heads, layout.head_dim,
    )
    if not shared or device.type != "cpu" or not shm_available():
        return KvMemory(torch.zeros(shape, dtype=layout.dtype, device=device))
    elem = torch.empty(0, dtype=layout.dtype).element_size()
    region = SharedRegion.create(math.prod(shape) * elem)
    flat = torch.frombuffer(region.view, dtype=torch.uint8)  # a fresh file reads as zeros
    return KvMemory(flat.view(layout.dtype).view(shape), region)
