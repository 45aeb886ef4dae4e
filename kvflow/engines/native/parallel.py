"""Tensor parallelism of the native engine: the process group, sharded weights, all-reduce, step broadcast.

Megatron-style split over `size` ranks, one process per rank: q/k/v and gate/up are
column-parallel (each rank holds `num_heads / size` query heads, `num_kv_heads / size` KV
heads and `intermediate / size` MLP columns), o_proj and down_proj are row-parallel (each
rank holds the matching input columns) and their partial outputs are summed by an
all-reduce (a forward hook on each attention and MLP module, so layers.py is unchanged).
Embedding, norms and LM head are replicated. Each rank reads only its slice of every
split tensor from safetensors (`safe_open(...).get_slice`).

Rank 0 runs the scheduler and the sampler; before each forward it broadcasts the step's
inputs (token ids, already chained with last step's sampled ids, positions and the
attention layout) packed into one int64 tensor, and the other ranks run the same forward
on their shard (`serve_steps`). A negative length ends the loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from kvflow.engines.native.attention import AttentionBackend, AttentionMetadata
from kvflow.engines.native.config import ModelConfig
from kvflow.engines.native.model import CausalLM, load_weights
from kvflow.engines.native.ops import Ops
from kvflow.engines.native.weights import empty_model, load_model, safetensors_files

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
GROUP_TIMEOUT = timedelta(seconds=120)
# Checkpoint tensors split by output rows (column-parallel) and by input columns (row-parallel).
_COLUMN = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "mlp.gate_proj.",
           "mlp.up_proj.")
_ROW = ("self_attn.o_proj.", "mlp.down_proj.")
_STOP = -1


class TensorParallelError(ValueError):
    """The model cannot be split this way (a head or column count not divisible by the size)."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    size: int


def rank_info(size: int) -> RankInfo | None:
    """This process's place among `size` ranks (its engine's --tensor-parallel-size), None
    when it runs alone. An engine of size 1 ignores any group another engine started here."""
    if size == 1:
        return None
    assert dist.is_initialized() and dist.get_world_size() == size, "join_group first"
    return RankInfo(dist.get_rank(), size)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: str, rank: int) -> str:
    """Each rank on its own GPU: "cuda"/"auto" (with a GPU) become cuda:<rank>; cpu stays."""
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{rank}"
    return "cpu" if device == "auto" else device


def master_store(size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free loopback port (`.port` tells the others)."""
    return dist.TCPStore(HOST, 0, size, is_master=True, timeout=GROUP_TIMEOUT,
                         wait_for_workers=False)


def join_group(rank: int, size: int, store: dist.Store, device: torch.device) -> None:
    """Join the default process group; gloo on CPU (over loopback), nccl on CUDA."""
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel group is already running in this process; "
                           "run one tensor-parallel engine per process")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=size,
                            timeout=GROUP_TIMEOUT)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- the model split --------------------------------------------------------------


def shard_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The shape one rank holds: heads, KV heads and MLP columns divided by `size`."""
    counts = {"attention heads": cfg.num_heads, "KV heads": cfg.num_kv_heads,
              "intermediate size": cfg.intermediate_size}
    bad = [f"{name} {n}" for name, n in counts.items() if n % size]
    if bad:
        raise TensorParallelError(
            f"--tensor-parallel-size {size} does not divide the model's {', '.join(bad)}; "
            "pick a size that divides every one of them"
        )
    return replace(cfg, num_heads=cfg.num_heads // size, num_kv_heads=cfg.num_kv_heads // size,
                   intermediate_size=cfg.intermediate_size // size)


def split_dim(name: str) -> int | None:
    """0 for a column-parallel tensor, 1 for a row-parallel weight, None when replicated."""
    if any(part in name for part in _COLUMN):
        return 0
    if any(part in name for part in _ROW) and name.endswith(".weight"):
        return 1
    return None


def iter_shard_tensors(
    files: list[Path], device: torch.device, info: RankInfo
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as this rank holds them, reading only its slice of each."""
    from safetensors import safe_open

    target = str(device) if device.type == "cuda" else "cpu"
    for path in files:
        with safe_open(str(path), framework="pt", device=target) as f:
            for name in f.keys():
                dim = split_dim(name)
                if dim is None:
                    yield name, f.get_tensor(name)
                    continue
                part = f.get_slice(name)
                n = part.get_shape()[dim] // info.size
                lo, hi = info.rank * n, (info.rank + 1) * n
                yield name, part[lo:hi] if dim == 0 else part[:, lo:hi]


def _all_reduce_output(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(out)
    return out


def add_all_reduces(model: CausalLM) -> None:
    """Sum the row-parallel outputs (o_proj, down_proj) over the ranks after each module."""
    for layer in model.layers:
        layer.self_attn.register_forward_hook(_all_reduce_output)
        layer.mlp.register_forward_hook(_all_reduce_output)


def load_local_model(
    model_dir: Path, cfg: ModelConfig, backend: AttentionBackend, max_positions: int,
    device: torch.device, dtype: torch.dtype, ops: Ops | None = None, tp_size: int = 1,
) -> CausalLM:
    """The whole model when alone, else this rank's shard with its all-reduces."""
    info = rank_info(tp_size)
    if info is None:
        return load_model(model_dir, cfg, backend, max_positions, device, dtype, ops)
    model = empty_model(shard_config(cfg, info.size), backend, max_positions, device, dtype, ops)
    load_weights(model, iter_shard_tensors(safetensors_files(model_dir), device, info))
    add_all_reduces(model)
    return model


def agree_num_blocks(num_blocks: int, device: torch.device, tp_size: int) -> int:
    """The fewest KV blocks any rank can hold (every rank's pool must be the same)."""
    if rank_info(tp_size) is None:
        return num_blocks
    t = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


# ---- the step broadcast ------------------------------------------------------------


@dataclass
class Step:
    """One forward's inputs as a non-zero rank receives them."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor,
              meta: AttentionMetadata) -> torch.Tensor:
    """[T, B, M, max_q, max_seq | ids | positions | slots | query_start | seq_lens | tables]."""
    tables = meta.block_tables
    head = torch.tensor([input_ids.numel(), meta.num_seqs, tables.shape[1], meta.max_query_len,
                         meta.max_seq_len], dtype=torch.int64, device=input_ids.device)
    parts = [head, input_ids, positions, meta.slot_mapping, meta.query_start_loc,
             meta.seq_lens, tables.reshape(-1)]
    return torch.cat([p.to(torch.int64) for p in parts])


def unpack_step(packed: torch.Tensor) -> Step:
    t, b, m, max_q, max_seq = packed[:5].tolist()
    sizes = [t, t, t, b + 1, b, b * m]
    ids, pos, slots, qsl, lens, tables = packed[5:].split(sizes)
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=qsl.to(torch.int32), seq_lens=lens.to(torch.int32),
        block_tables=tables.to(torch.int32).view(b, m), max_query_len=max_q,
        max_seq_len=max_seq, query_start_host=qsl.tolist(), seq_lens_host=lens.tolist(),
    )
    return Step(ids, pos, meta)


def broadcast_step(module: nn.Module, args: tuple) -> None:
    """Rank 0's forward pre-hook: send the step's inputs to the other ranks."""
    input_ids, positions, meta = args
    packed = pack_step(input_ids, positions, meta)
    dist.broadcast(torch.tensor([packed.numel()], device=packed.device), src=0)
    dist.broadcast(packed, src=0)


def drive_ranks(model: CausalLM) -> None:
    """Make rank 0's model broadcast every forward's inputs first."""
    model.register_forward_pre_hook(broadcast_step)


def broadcast_stop(device: torch.device) -> None:
    dist.broadcast(torch.tensor([_STOP], dtype=torch.int64, device=device), src=0)


def receive_step(device: torch.device) -> Step | None:
    length = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    n = int(length.item())
    if n == _STOP:
        return None
    packed = torch.empty(n, dtype=torch.int64, device=device)
    dist.broadcast(packed, src=0)
    return unpack_step(packed)


@torch.inference_mode()
def serve_steps(model: CausalLM, device: torch.device) -> int:
    """A non-zero rank's loop: run each broadcast step's forward until rank 0 says stop."""
    steps = 0
    while (step := receive_step(device)) is not None:
        model(step.input_ids, step.positions, step.meta)
        steps += 1
    return steps
