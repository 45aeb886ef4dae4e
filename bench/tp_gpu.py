"""Tensor parallelism on 2 GPUs: TP=2 decode tokens/s against the per-GPU floor, and GPU0->GPU1 KV GB/s.

    PYTHONPATH=. python bench/tp_gpu.py [--shapes 8b 70b] [--batches 1 64] [--context 1024]
    PYTHONPATH=. python bench/tp_gpu.py --cpu-smoke      # the same code, tiny shape, gloo, CPU

Written for a 2 x H200 host and NOT run there yet (no multi-GPU machine was lent when it
was written); `--cpu-smoke` runs every part on CPU with a tiny shape to check the code.
Random bf16 weights are drawn on each GPU (no files: a 70B checkpoint would not fit the
disk), each rank holding its shard exactly as `--tensor-parallel-size 2` loads it
(kvflow.engines.native.parallel: shard_config + all-reduce hooks + step broadcast).

1. Decode: one rank process per GPU; rank 0 broadcasts each step's inputs, both run the
   forward (all-reduce after o_proj and down_proj, NCCL), rank 0 computes logits. Tokens/s
   at each batch over `--steps` steps with `--context` tokens of KV per sequence, against
   the floor: (this rank's weight bytes + its KV bytes read per step) / measured HBM
   bandwidth. The 8B shape also runs at TP=1 (one GPU) in the same invocation: the ratio.
   Eager: CUDA-graph capture of the NCCL all-reduce is not implemented yet.
2. KV transfer: a 2,048-token 8B-shape prompt's KV (32 layers x 8 KV heads x 128 dims,
   bf16: 256 MiB) through kvflow's cuda_ipc backend copy (`copy_runs`) between engines of
   TP size 1 and 2 in every direction: TP=1 GPU0 -> TP=1 GPU1 (one run, and block by
   block), TP=2 -> TP=1 and TP=1 -> TP=2 (heads re-sliced, half of them cross GPUs) and
   TP=2 -> TP=2. Each source rank's cache is its own process's, opened by CUDA IPC, and so
   is a TP=2 puller's rank-1 cache (as a decode engine's rank 0 writes it). Against the
   measured GPU0->GPU1 copy bandwidth of a 1 GiB tensor (the floor), with NCCL send/recv
   and host staging (what shm/tcp would do between GPUs) measured in the same run; every
   copy is checked bit-exact against its source.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

from kvflow.engines.native import parallel
from kvflow.engines.native.attention import make_backend, uniform_decode_meta
from kvflow.engines.native.config import ModelConfig, RopeConfig
from kvflow.engines.native.kv_cache import KvCacheLayout, allocate_kv_cache
from kvflow.engines.native.ops import make_ops
from kvflow.engines.native.weights import empty_model
from kvflow.kv.blocks import BlockRun
from kvflow.kv.layout import KvLayout
from kvflow.kv.transfer.cuda_ipc import copy_runs, open_handle, share_handle

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               num_kv_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                num_kv_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, vocab_size=512),
}
BLOCK = 16


def model_config(shape: str) -> ModelConfig:
    s = SHAPES[shape]
    return ModelConfig(arch="llama", head_dim=s["hidden_size"] // s["num_heads"],
                       max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope=RopeConfig(theta=500000.0), torch_dtype="bfloat16", **s)


@dataclass(frozen=True)
class Job:
    shape: str
    size: int
    batches: tuple[int, ...]
    context: int
    steps: int
    device: str  # "cuda" or "cpu"
    port: int


def _timer(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def build_rank(job: Job, rank: int) -> tuple:  # type: ignore[type-arg]
    """This rank's shard of the model with random weights, and a KV cache for the batches."""
    device = torch.device(f"cuda:{rank}" if job.device == "cuda" else "cpu")
    cfg = model_config(job.shape)
    local = parallel.shard_config(cfg, job.size) if job.size > 1 else cfg
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = empty_model(local, make_backend("auto", device), 8192, device, dtype,
                        make_ops("auto", device))
    for p in model.parameters():
        p.normal_(0.0, 0.02)
    if job.size > 1:
        parallel.add_all_reduces(model)
    blocks = max(job.batches) * -(-(job.context + 1) // BLOCK)
    layout = KvCacheLayout(blocks, BLOCK, local.num_layers, local.num_kv_heads, local.head_dim,
                           dtype)
    model.set_kv_caches(allocate_kv_cache(layout, device))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token_bytes = 2 * local.num_layers * local.num_kv_heads * local.head_dim * dtype.itemsize
    return model, device, weight_bytes, kv_token_bytes


@torch.inference_mode()
def decode_rank(rank: int, job: Job, out: str) -> None:
    if job.size > 1:
        store = torch.distributed.TCPStore(parallel.HOST, job.port, job.size, is_master=rank == 0,
                                           timeout=parallel.GROUP_TIMEOUT)
        device = torch.device(f"cuda:{rank}" if job.device == "cuda" else "cpu")
        parallel.join_group(rank, job.size, store, device)
    model, device, weight_bytes, kv_token_bytes = build_rank(job, rank)
    if rank != 0:
        parallel.serve_steps(model, device)
        parallel.leave_group()
        return
    if job.size > 1:
        parallel.drive_ranks(model)
    bandwidth = hbm_bandwidth(device)
    results = []
    for batch in job.batches:
        meta = uniform_decode_meta(batch, job.context, BLOCK, device)
        ids = torch.randint(0, model.cfg.vocab_size, (batch,), device=device)
        pos = torch.full((batch,), job.context, device=device)
        for _ in range(3):  # warm-up
            model.compute_logits(model(ids, pos, meta)).argmax(-1)
        t0 = _timer(device)
        for _ in range(job.steps):
            ids = model.compute_logits(model(ids, pos, meta)).argmax(-1)
        seconds = (_timer(device) - t0) / job.steps
        floor = (weight_bytes + batch * job.context * kv_token_bytes) / bandwidth
        results.append([job.shape, job.size, batch, batch / seconds, batch / floor])
    Path(out).write_text(json.dumps(results))
    if job.size > 1:
        parallel.broadcast_stop(device)
        parallel.leave_group()


def hbm_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB copy on `device` (read + write); 64 MiB on CPU."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = _timer(device)
    for _ in range(5):
        dst.copy_(src)
    return 2 * src.numel() * 4 * 5 / (_timer(device) - t0)


def run_decode(job: Job) -> dict[tuple[str, int, int], tuple[float, float]]:
    """{(shape, tp, batch): (tokens/s, floor tokens/s)}; rank 0 writes them as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(decode_rank, args=(job, out), nprocs=job.size, join=True)
        rows = json.loads(Path(out).read_text())
    return {(s, n, b): (tps, floor) for s, n, b, tps, floor in rows}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((parallel.HOST, 0))
        return int(sock.getsockname()[1])


# ---- KV transfer ----------------------------------------------------------------------


def kv_layout(tokens: int, heads: int, shape: str, dtype: str) -> KvLayout:
    cfg = model_config(shape)
    return KvLayout(num_layers=cfg.num_layers, block_size=BLOCK, num_kv_heads=heads,
                    head_dim=cfg.head_dim, dtype=dtype, num_slots=tokens // BLOCK)


def keeper(conn, layout: KvLayout, device: str, fill: bool) -> None:  # type: ignore[no-untyped-def]
    """Another process's KV memory on `device` (random, or zeros for a destination rank), its
    CUDA IPC handle sent once, kept until told: a TP engine's rank, or a whole TP=1 engine."""
    dtype = getattr(torch, layout.dtype)
    shape = (layout.num_layers, 2, layout.num_slots, BLOCK, layout.num_kv_heads, layout.head_dim)
    cache = (torch.randn(shape, device=device) if fill else torch.zeros(shape, device=device)).to(dtype)
    torch.cuda.synchronize(device)
    conn.send(share_handle(cache))
    conn.recv()


def copy_gbps(fn, nbytes: int, device: torch.device, reps: int = 5) -> float:  # type: ignore[no-untyped-def]
    fn()
    t0 = _timer(device)
    for _ in range(reps):
        fn()
    return nbytes * reps / (_timer(device) - t0) / 1e9


def nccl_rank(rank: int, port: int, nbytes: int, reps: int, out: str) -> None:
    """GPU0 -> GPU1 by NCCL send/recv (the other way a KV plane could move blocks)."""
    device = torch.device(f"cuda:{rank}")
    store = torch.distributed.TCPStore(parallel.HOST, port, 2, is_master=rank == 0,
                                       timeout=parallel.GROUP_TIMEOUT)
    parallel.join_group(rank, 2, store, device)
    buf = torch.ones(nbytes, dtype=torch.uint8, device=device) if rank == 0 else \
        torch.empty(nbytes, dtype=torch.uint8, device=device)

    def once() -> None:
        if rank == 0:
            torch.distributed.send(buf, 1)
        else:
            torch.distributed.recv(buf, 0)

    once()
    torch.distributed.barrier()
    t0 = _timer(device)
    for _ in range(reps):
        once()
    seconds = _timer(device) - t0
    if rank == 1:
        assert bool((buf == 1).all())
        Path(out).write_text(json.dumps(nbytes * reps / seconds / 1e9))
    parallel.leave_group()


def nccl_gbps(nbytes: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "gbps.json")
        mp.spawn(nccl_rank, args=(free_port(), nbytes, 5, out), nprocs=2, join=True)
        return float(json.loads(Path(out).read_text()))


def run_transfer(tokens: int) -> None:
    """GPU0 <-> GPU1 KV of an 8B-shape prompt, through kvflow's cuda_ipc copy
    (`kvflow.kv.transfer.cuda_ipc.copy_runs`, the backend's own code) between engines of TP
    size 1 and 2, every source rank a separate process whose cache is opened by CUDA IPC,
    and a TP=2 puller's rank-1 cache opened the same way (as tp_ranks.RankGroup.kv_shards
    does); against P2P copy, NCCL send/recv and host staging measured here."""
    src_dev, dst_dev = torch.device("cuda:0"), torch.device("cuda:1")
    big = torch.empty(1 << 30, dtype=torch.uint8, device=src_dev)
    big_dst = torch.empty_like(big, device=dst_dev)
    p2p = copy_gbps(lambda: big_dst.copy_(big), big.numel(), dst_dev)
    local = copy_gbps(lambda: big_dst[: 1 << 29].copy_(big_dst[1 << 29 :]), 1 << 29, dst_dev)
    print(f"P2P copy GPU0->GPU1, 1 GiB: {p2p:.1f} GB/s "
          f"(peer access: {torch.cuda.can_device_access_peer(1, 0)}); "
          f"within GPU1, 512 MiB: {local:.1f} GB/s")
    whole, half = kv_layout(tokens, 8, "8b", "bfloat16"), kv_layout(tokens, 4, "8b", "bfloat16")
    nbytes = whole.num_slots * whole.block_bytes
    pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    staged = copy_gbps(lambda: (pinned.copy_(big[:nbytes]),  # waits: D2H done before H2D
                                big_dst[:nbytes].copy_(pinned, non_blocking=True)), nbytes, dst_dev)
    nccl = nccl_gbps(nbytes)
    print(f"KV {tokens} tokens 8B shape ({nbytes / 2**20:.0f} MiB): NCCL send/recv GPU0->GPU1 "
          f"{nccl:.1f} GB/s ({nccl / p2p:.0%} of P2P); host-staged D2H+H2D {staged:.1f} GB/s "
          f"({staged / p2p:.0%})")
    ctx = mp.get_context("spawn")
    keepers = {  # name: (layout, device, random)
        "tp1@0": (whole, "cuda:0", True), "tp2r0@0": (half, "cuda:0", True),
        "tp2r1@1": (half, "cuda:1", True), "dst_tp2r1@1": (half, "cuda:1", False)}
    conns, procs, opened = {}, [], {}
    for name, (layout, device, fill) in keepers.items():
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=keeper, args=(theirs, layout, device, fill))
        proc.start()
        conns[name] = ours
        procs.append(proc)
    for name, (layout, _, _) in keepers.items():
        opened[name] = open_handle(conns[name].recv(), layout)
    dst_tp1 = torch.empty(opened["tp1@0"].shape, dtype=opened["tp1@0"].dtype, device=dst_dev)
    dst_tp2 = [torch.empty(opened["tp2r0@0"].shape, dtype=dst_tp1.dtype, device=src_dev),
               opened["dst_tp2r1@1"]]
    tp1_src, tp2_src = [opened["tp1@0"]], [opened["tp2r0@0"], opened["tp2r1@1"]]
    one_run = [BlockRun(0, 0, whole.num_slots)]
    by_block = [BlockRun(b, b, 1) for b in range(whole.num_slots)]
    cases = [  # name, src ranks, dst ranks, runs, the part that crosses GPUs
        ("TP=1 GPU0 -> TP=1 GPU1, one run", tp1_src, [dst_tp1], one_run, "all"),
        ("TP=1 GPU0 -> TP=1 GPU1, block by block", tp1_src, [dst_tp1], by_block, "all"),
        ("TP=2 GPU0+1 -> TP=1 GPU1 (re-sliced)", tp2_src, [dst_tp1], one_run, "half"),
        ("TP=1 GPU0 -> TP=2 GPU0+1 (re-sliced)", tp1_src, dst_tp2, one_run, "half"),
        ("TP=2 GPU0+1 -> TP=2 GPU0+1", tp2_src, dst_tp2, one_run, "none"),
    ]
    for name, src, dst, runs, crossing in cases:
        for t in dst:
            t.zero_()
        gbps = copy_gbps(lambda src=src, dst=dst, runs=runs: copy_runs(src, dst, runs), nbytes, dst_dev)
        want = torch.cat([t.to(dst_dev) for t in src], dim=4)
        assert torch.equal(torch.cat([t.to(dst_dev) for t in dst], dim=4), want), name
        print(f"{name}: {gbps:.1f} GB/s of KV ({gbps / p2p:.0%} of P2P; {crossing} of it crosses "
              "GPUs); bit-exact")
    for conn in conns.values():
        conn.send("done")
    for proc in procs:
        proc.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["8b", "70b"], choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--transfer-tokens", type=int, default=2048)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU (gloo), no transfer")
    args = p.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    shapes = ["tiny"] if args.cpu_smoke else args.shapes
    if device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, torch sees {torch.cuda.device_count()}; try --cpu-smoke")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    base = Job("8b" if device == "cuda" else "tiny", 1, tuple(args.batches), args.context,
               args.steps, device, 0)
    rows = run_decode(base)  # TP=1 baseline (one GPU) for the small shape
    for shape in shapes:
        rows |= run_decode(replace(base, shape=shape, size=2, port=free_port()))
    for (shape, size, batch), (tps, floor) in sorted(rows.items()):
        print(f"decode {shape:>4} TP={size} batch {batch:>3}: {tps:9.1f} tok/s "
              f"(floor {floor:9.1f}, {tps / floor:.0%} of floor)")
    for shape in shapes:
        for batch in args.batches:
            if (shape, 1, batch) in rows and (shape, 2, batch) in rows:
                print(f"TP=2 / TP=1 {shape} batch {batch}: "
                      f"{rows[(shape, 2, batch)][0] / rows[(shape, 1, batch)][0]:.2f}x")
    if device == "cuda":
        run_transfer(args.transfer_tokens)


if __name__ == "__main__":
    main()
