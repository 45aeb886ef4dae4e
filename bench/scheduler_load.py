"""Cost of the engine core's load metrics with a deep waiting queue (published every 50 ms
from the engine thread, so it must stay far below that).

    .venv/bin/python bench/scheduler_load.py [--waiting 1000] [--prompt 2048]

Every waiting prompt shares a cached `--prompt`-token prefix (the worst case for the cached
prefix lookup). Prints ms per `load_metrics()` against the same call with the lookup
limited to nothing (LOAD_EXACT_WAITING = 0), the floor of the queue walk itself.
"""

from __future__ import annotations

import argparse
import time

import kvflow.engines.core.load_signal as load_signal
from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import Scheduler, SchedulerConfig
from kvflow.engines.core.sequence import Sequence, StopRule


def ms_per_call(sched: Scheduler, reps: int = 20) -> float:
    sched.load_metrics()
    started = time.perf_counter()
    for _ in range(reps):
        sched.load_metrics()
    return (time.perf_counter() - started) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--waiting", type=int, default=1000)
    ap.add_argument("--prompt", type=int, default=2048)
    args = ap.parse_args()
    bs = 16
    sched = Scheduler(SchedulerConfig(block_size=bs, max_num_seqs=1, max_num_batched_tokens=4096),
                      BlockPool(args.prompt // bs + 64, bs))
    prefix = list(range(1, args.prompt + 1))
    sched.add(Sequence("first", prefix, StopRule(max_tokens=1)))
    while sched.has_work():
        out = sched.schedule()
        sched.update({s.seq.request_id: [1] for s in out.scheduled if s.samples})
    for i in range(args.waiting):
        sched.add(Sequence(f"w{i}", prefix + [5000 + i] * bs, StopRule(max_tokens=1)))
    exact = load_signal.LOAD_EXACT_WAITING
    head = ms_per_call(sched)
    load_signal.LOAD_EXACT_WAITING = args.waiting
    every = ms_per_call(sched)
    load_signal.LOAD_EXACT_WAITING = 0
    floor = ms_per_call(sched)
    print(f"{args.waiting} waiting prompts of {args.prompt + bs} tokens, {args.prompt} cached")
    print(f"lookup of the head ({exact}), rest scaled: {head:7.3f} ms ({head / floor:.1f}x floor)")
    print(f"lookup of every waiting prompt:        {every:7.3f} ms ({every / floor:.1f}x floor)")
    print(f"no lookup (floor: the queue walk):     {floor:7.3f} ms")


if __name__ == "__main__":
    main()
