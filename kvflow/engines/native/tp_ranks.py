"""The processes of a tensor-parallel native engine: rank 0 starts, watches and stops ranks 1..N-1.

Rank 0 is the engine's own process (scheduler, sampler, KV events, load metrics: one per
engine, so the router sees one worker). It opens the rendezvous store, starts one
`python -m kvflow.engines.native.tp_ranks` per other rank (own session, so a terminal's
Ctrl-C reaches only rank 0, which stops them in order), then joins the group and loads its
own shard. A rank that dies unexpectedly takes the engine down: the watcher logs which
rank and its exit code, ends the remaining ranks and exits the process (a collective
would otherwise wait for the dead rank). A rank whose parent disappears exits too.

Each rank tells rank 0 (through the rendezvous store) where its KV shard lives: its /dev/shm
region (CPU, shared_kv) or its cache's CUDA IPC handle (GPU). Rank 0 opens them all
(`RankGroup.kv_shards`), so its transfer agent serves and writes every rank's KV heads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import torch

from kvflow.engines.native import parallel
from kvflow.engines.native.config import NativeEngineConfig, UnsupportedModelError
from kvflow.engines.native.fp8 import fp8_scheme
from kvflow.engines.native.kv_io import block_io, kv_layout
from kvflow.engines.native.runner import ModelRunner
from kvflow.kv.blocks import RegionBlockIO
from kvflow.kv.connector import KvShard
from kvflow.kv.shm import SharedRegion

log = logging.getLogger(__name__)

POLL_S = 0.2
STOP_TIMEOUT_S = 10.0
EXIT_RANK_LOST = 3


def rank_config(config: NativeEngineConfig, rank: int) -> NativeEngineConfig:
    """A rank's config: its own device; eager (CUDA-graph capture of the all-reduce is not
    implemented yet). With shared_kv every rank's KV shard is its own /dev/shm region."""
    return dataclasses.replace(config, device=parallel.rank_device(config.device, rank),
                               enforce_eager=True)


def _region_key(rank: int) -> str:
    return f"kv_region/{rank}"


def _cuda_key(rank: int) -> str:
    return f"kv_cuda_ipc/{rank}"


def _die(message: str) -> None:
    log.error("%s", message)
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(EXIT_RANK_LOST)


class RankGroup:
    """Ranks 1..N-1 seen from rank 0: started, watched, stopped."""

    def __init__(self, procs: list[subprocess.Popen], device: torch.device,
                 kv_regions: list[str | None], on_lost: Callable[[str], None] = _die,
                 kv_handles: list[list[bytes | int] | None] | None = None) -> None:
        self.procs, self.device, self.on_lost = procs, device, on_lost
        # Where ranks 1..N-1 keep their KV: /dev/shm regions (shared_kv on CPU) or CUDA IPC
        # handles (GPU); rank 0 opens them for the transfer plane (kv_shards).
        self.kv_regions = kv_regions
        self.kv_handles = kv_handles or [None] * len(kv_regions)
        self._opened: list[SharedRegion] = []
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="tp-ranks", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(POLL_S):
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    self._kill_all()
                    self.on_lost(f"kvflow native engine: tensor-parallel rank {rank} (pid "
                                 f"{proc.pid}) exited with code {code}; the engine stops. "
                                 "See that rank's log above for the cause.")
                    return

    def _kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def kv_shards(self, runner: ModelRunner) -> tuple[KvShard, ...]:
        """Ranks 1..N-1's KV memories opened in this process, shaped like rank 0's (`runner`'s);
        empty when some rank's memory cannot be opened here (no shared_kv on CPU)."""
        shards: list[KvShard] = []
        for name, handle in zip(self.kv_regions, self.kv_handles, strict=True):
            if handle is not None:
                from kvflow.kv.transfer.cuda_ipc import open_handle

                tensor = open_handle(handle, kv_layout(runner.layout, runner.device))
                layout = kv_layout(runner.layout, tensor.device)  # rank r's own GPU
                shards.append(KvShard(block_io(layout, tensor), cuda_ipc=handle))
            elif name is not None:
                region = SharedRegion.attach(name, writable=True)
                self._opened.append(region)
                layout = kv_layout(runner.layout, runner.device)
                shards.append(KvShard(RegionBlockIO(layout, region.view), shm_name=name))
            else:
                return ()
        return tuple(shards)

    def close_shards(self) -> None:
        """Unmap the other ranks' regions (after the transfer plane stopped using them)."""
        for region in self._opened:
            with contextlib.suppress(BufferError):  # a pull still holds a view: unmapped at exit
                region.close()
        self._opened.clear()

    def stop(self) -> None:
        """Tell every rank to stop after its current step, then wait (kill on timeout)."""
        self._stopping.set()
        try:
            parallel.broadcast_stop(self.device)
        except Exception as exc:  # a rank already gone: the others are killed below
            log.warning("tensor-parallel stop broadcast failed: %r", exc)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        parallel.leave_group()


def _spawn(config: NativeEngineConfig, rank: int, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvflow.engines.native.tp_ranks", "--rank", str(rank),
           "--port", str(port), "--parent", str(os.getpid()),
           "--config", msgspec.json.encode(config).decode()]
    return subprocess.Popen(cmd, start_new_session=True)


def refuse_fp8_shards(model_dir: Path) -> None:
    """Tensor parallelism loads each rank's slice of plain weights only: an FP8 checkpoint
    (weights plus per-channel scales to slice alike) is refused before any rank starts."""
    config = model_dir / "config.json"
    if config.is_file() and fp8_scheme(json.loads(config.read_text())) is not None:
        raise UnsupportedModelError(
            f"{model_dir} is an FP8 checkpoint; --tensor-parallel-size > 1 serves unquantised "
            "(bf16/fp16/fp32) checkpoints only for now: use --tensor-parallel-size 1 or a bf16 copy")


def load_runner(config: NativeEngineConfig) -> tuple[ModelRunner, RankGroup | None]:
    """The engine's runner: alone, or rank 0 of `tensor_parallel_size` ranks it starts."""
    size = config.tensor_parallel_size
    if size == 1:
        return ModelRunner.load(config), None
    refuse_fp8_shards(Path(config.model_path))
    store = parallel.master_store(size)
    procs = [_spawn(config, rank, store.port) for rank in range(1, size)]
    local = rank_config(config, 0)
    device = torch.device(parallel.rank_device(local.device, 0))
    try:
        parallel.join_group(0, size, store, device)
        runner = ModelRunner.load(local)
    except BaseException:
        for proc in procs:
            proc.kill()
        parallel.leave_group()
        raise
    parallel.drive_ranks(runner.model)
    regions = [store.get(_region_key(rank)).decode() or None for rank in range(1, size)]
    handles = [msgspec.msgpack.decode(store.get(_cuda_key(rank))) or None for rank in range(1, size)]
    return runner, RankGroup(procs, runner.device, regions, kv_handles=handles)


# ---- a non-zero rank's process --------------------------------------------------------


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(POLL_S * 5)
        if os.getppid() != parent:
            _die(f"kvflow tensor-parallel rank: the engine process {parent} is gone; exiting")


def serve_rank(config: NativeEngineConfig, rank: int, port: int) -> int:
    """Join the group, load this rank's shard, run steps until rank 0 says stop."""
    size = config.tensor_parallel_size
    local = rank_config(config, rank)
    device = torch.device(parallel.rank_device(local.device, rank))
    store = torch.distributed.TCPStore(parallel.HOST, port, size, is_master=False,
                                       timeout=parallel.GROUP_TIMEOUT)
    parallel.join_group(rank, size, store, device)
    runner = ModelRunner.load(local)
    store.set(_region_key(rank), runner.shared_region_name() or "")
    whole = runner.kv_memory.whole
    handle = None
    if whole.device.type == "cuda":
        from kvflow.kv.transfer.cuda_ipc import share_handle

        handle = share_handle(whole)
    store.set(_cuda_key(rank), msgspec.msgpack.encode(handle))
    steps = parallel.serve_steps(runner.model, runner.device)
    parallel.leave_group()
    if runner.kv_memory.region is not None:
        runner.kv_memory.region.close()
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one non-zero rank of a tensor-parallel native engine")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--config", required=True, help="NativeEngineConfig as JSON")
    ns = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 stops us
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {ns.rank}] %(message)s")
    threading.Thread(target=_watch_parent, args=(ns.parent,), daemon=True).start()
    config = msgspec.json.decode(ns.config, type=NativeEngineConfig)
    try:
        serve_rank(config, ns.rank, ns.port)
    except Exception as exc:
        log.error("tensor-parallel rank %d failed: %r", ns.rank, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
