"""Planner benchmark: a synthetic day on simulated mocker workers — planner vs fixed fleets vs an oracle.

    .venv/bin/python bench/planner.py [--day-s 1200] [--mean-rate 10] [--seed 0]

The day (diurnal rate with a trough, a peak and bursts, mixed ISL/OSL) is compressed
into --day-s seconds of virtual time and run by kvflow.replay.sim (the real engine
core, the mocker's timing model, a virtual clock). New workers serve after
--startup-s. Each run reports SLA attainment (share of --window-s windows, 60 s as
the issue asks, whose TTFT p90 and ITL p90 meet the targets) and worker-seconds held.
Baselines in the same run:
- the oracle (kvflow.replay.oracle): it knows the trace and searches, on the same
  simulator, the fewest workers each window needs (asked for --startup-s ahead);
- every fixed fleet size from the oracle's peak: the smallest meeting >= 99% of
  windows is "best fixed";
- the planner, for each --predictors x --burst-ratios, never reading the future;
- with --bound-reserves, the floor for a causal planner (kvflow.replay.oracle's
  reactive_controller): it knows the steady (diurnal) traffic ahead but learns of a burst
  one interval after it begins. For each reserve R it holds, window by window, the
  oracle's sizes for the steady traffic at R times its rate (the day's bursts thinned
  away, plus R - 1 other burst-free days), and once it knows of a burst, the oracle's
  sizes for the burst's windows (plus --bound-extra). The smallest R meeting every
  window bounds what any planner that must wait for a burst to begin can reach.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass

from kvflow.engines.mocker.timing import TimingModel, TimingParams
from kvflow.planner.decide import Bounds, Rules, Sla
from kvflow.planner.model import Fleet
from kvflow.planner.observe import Observation
from kvflow.planner.perf import PerfModel
from kvflow.planner.planner import Planner
from kvflow.replay.oracle import oracle_schedule, reactive_controller
from kvflow.replay.report import attainment, windows
from kvflow.replay.sim import SimEngine, SimResult, Simulation
from kvflow.replay.trace import BURST_RATIO, TraceRequest, synthetic_bursts, synthetic_day, without_bursts
from kvflow.router.config import KvRouterConfig

# A worker slower than the default H100 model (a smaller GPU): fewer steps to simulate,
# and a fleet of several workers at a modest request rate.
TIMING = TimingParams(hbm_bandwidth=1.0e12, matmul_flops=2.0e14, attn_flops=1.3e14)


@dataclass(frozen=True)
class Row:
    name: str
    attainment: float
    worker_seconds: float
    requests: int
    failed: int
    wall_s: float


def router(args: argparse.Namespace) -> KvRouterConfig | None:
    """The router's hold, the same for every fleet in the run (None: route on arrival)."""
    if not args.hold_active and not args.hold_prefill_tokens:
        return None
    return KvRouterConfig(max_active_requests=args.hold_active or None,
                          max_prefill_tokens=args.hold_prefill_tokens or None,
                          max_queue=100_000, queue_timeout_s=args.hold_timeout_s)


def simulation(trace: list[TraceRequest], args: argparse.Namespace, workers: int,
               controller=None) -> Simulation:
    return Simulation(trace, workers=workers, timing=TimingModel(TIMING), interval_s=args.interval_s,
                      engine=SimEngine(startup_s=args.startup_s), controller=controller,
                      router=router(args))


def row(name: str, result: SimResult, args: argparse.Namespace, started: float) -> Row:
    stats = windows(result.results, args.window_s, args.ttft, args.itl)
    failed = sum(1 for r in result.results if r.error)
    out = Row(name, attainment(stats), result.worker_seconds, len(result.results), failed,
              time.monotonic() - started)
    print(f"{out.name:>28} {out.attainment:9.1%} {out.worker_seconds:10.0f} {out.requests:8d} "
          f"{out.failed:6d} {out.wall_s:7.1f}", flush=True)
    missed = [f"{w.start_s:.0f}s (TTFT {w.ttft_p90_s:.2f}s, ITL {w.itl_p90_s * 1e3:.1f}ms)"
              for w in stats if not w.meets_sla]
    if missed:
        print(f"{'':>28} missed: {'; '.join(missed)}", flush=True)
    return out


def run(name: str, trace: list[TraceRequest], args: argparse.Namespace, workers: int,
        controller=None) -> Row:
    started = time.monotonic()
    return row(name, simulation(trace, args, workers, controller).run(), args, started)


def rules(args: argparse.Namespace, burst_ratio: float) -> Rules:
    return Rules(Sla(args.ttft * args.margin, args.itl * args.margin), Bounds(1, args.max_workers),
                 headroom=args.headroom, burst_ratio=burst_ratio, backlog_drain_s=args.backlog_drain_s,
                 scale_down_intervals=args.scale_down_intervals, cooldown_s=args.cooldown_s,
                 max_scale_down_step=args.max_scale_down_step)


def planner_controller(args: argparse.Namespace, perf: PerfModel, predictor: str, burst_ratio: float):
    planner = Planner(rules(args, burst_ratio), perf, Fleet(aggregated=1), predictor=predictor,
                      settle_s=args.startup_s, baseline_s=args.baseline_s)

    def control(now: float, obs: Observation) -> int:
        return planner.step(now, obs).target.aggregated
    return control


def steady_traffic(trace: list[TraceRequest], args: argparse.Namespace, reserve: float) -> list[TraceRequest]:
    """The day's steady part at `reserve` times its rate: the bursts thinned away, plus reserve - 1
    other burst-free days of the same shape (the last one thinned to the fraction left)."""
    bursts = synthetic_bursts(seed=args.seed, day_s=args.day_s)
    steady = without_bursts(trace, bursts, BURST_RATIO, seed=args.seed)
    rng = random.Random(args.seed + 7)
    for i in range(math.ceil(reserve - 1.0)):  # one more burst-free day per unit of reserve over 1
        other = synthetic_day(seed=args.seed + 1000 + i, day_s=args.day_s, mean_rate=args.mean_rate, bursts=0)
        steady += [r for r in other if rng.random() < reserve - 1.0 - i]
    return sorted(steady, key=lambda r: r.arrival_s)


def bound(trace: list[TraceRequest], args: argparse.Namespace, burst_sizes: list[int], reserve: float) -> Row:
    """The causal floor at one reserve: steady sizes from the oracle on the steady traffic x reserve,
    the oracle's burst sizes once a burst is known (an interval after it begins)."""
    started = time.monotonic()
    steady = steady_traffic(trace, args, reserve)
    found = oracle_schedule(steady, lambda n: simulation(steady, args, n), window_s=args.window_s,
                            ttft_sla=args.ttft, itl_sla=args.itl, startup_s=args.startup_s,
                            max_workers=args.max_workers)
    sizes = found.schedule + [found.schedule[-1]] * max(0, len(burst_sizes) - len(found.schedule))
    control = reactive_controller(sizes, burst_sizes + [0] * max(0, len(sizes) - len(burst_sizes)),
                                  synthetic_bursts(seed=args.seed, day_s=args.day_s),
                                  window_s=args.window_s, startup_s=args.startup_s, detect_s=args.interval_s)
    out = row(f"bound reserve {reserve:g}", simulation(trace, args, sizes[0], control).run(), args, started)
    print(f"{'':>28} steady sizes: {' '.join(map(str, found.schedule))}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--day-s", type=float, default=1200.0)
    p.add_argument("--mean-rate", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-s", type=float, default=10.0)
    p.add_argument("--interval-s", type=float, default=5.0)
    p.add_argument("--window-s", type=float, default=60.0)
    p.add_argument("--ttft", type=float, default=1.0, help="TTFT p90 target, s")
    p.add_argument("--itl", type=float, default=0.04, help="ITL p90 target, s")
    p.add_argument("--margin", type=float, default=1.0, help="the planner aims at margin x the SLA")
    p.add_argument("--headroom", type=float, default=0.15)
    p.add_argument("--burst-ratios", type=float, nargs="+", default=[0.0, 2.5],
                   help="planner runs with each --burst-ratio (0: no burst reserve)")
    p.add_argument("--baseline-s", type=float, default=120.0)
    p.add_argument("--hold-active", type=int, default=0,
                   help="router busy threshold for every fleet: requests per worker beyond which new "
                        "ones wait at the router (--router-max-active-requests; 0: off)")
    p.add_argument("--hold-prefill-tokens", type=int, default=0,
                   help="router busy threshold: queued prefill tokens per worker "
                        "(--router-max-prefill-tokens; 0: off)")
    p.add_argument("--hold-timeout-s", type=float, default=60.0,
                   help="a request held longer fails (--router-queue-timeout-s)")
    p.add_argument("--backlog-drain-s", type=float, default=0.0,
                   help="planner sizes for the router's held requests over this many seconds (0: off)")
    p.add_argument("--scale-down-intervals", type=int, default=3)
    p.add_argument("--cooldown-s", type=float, default=15.0)
    p.add_argument("--max-scale-down-step", type=int, default=8)
    p.add_argument("--bound-reserves", type=float, nargs="*", default=[],
                   help="also run the causal floor (see above) with each reserve R >= 1 (slow: an oracle "
                        "search each)")
    p.add_argument("--bound-extra", type=int, default=0,
                   help="the bound's burst sizes: the oracle's plus this many workers")
    p.add_argument("--predictors", nargs="+", default=["kalman", "moving_average", "constant"])
    p.add_argument("--max-workers", type=int, default=12)
    p.add_argument("--fixed", type=int, nargs="*",
                   help="fixed fleet sizes to run (default: from the oracle's peak, down to the smallest "
                        "meeting 99%% of windows)")
    args = p.parse_args()
    if any(r < 1 for r in args.bound_reserves) or args.bound_extra < 0:
        p.error("--bound-reserves must be >= 1 (a multiple of the steady rate), --bound-extra >= 0")
    trace = synthetic_day(seed=args.seed, day_s=args.day_s, mean_rate=args.mean_rate)
    perf = PerfModel.from_timing(TimingModel(TIMING))
    print(f"synthetic day (seed {args.seed}): {len(trace)} requests over {args.day_s:.0f}s virtual; SLA "
          f"TTFT p90 <= {args.ttft}s, ITL p90 <= {args.itl * 1e3:.0f}ms per {args.window_s:.0f}s window; "
          f"workers serve {args.startup_s:.0f}s after being asked; planner every {args.interval_s:.0f}s")
    hold = router(args)
    print("router hold: " + (f"a worker is busy at {hold.max_active_requests} requests or "
                             f"{hold.max_prefill_tokens} queued prefill tokens (None = no limit); "
                             f"the planner plans for held requests over {args.backlog_drain_s:g}s"
                             if hold else "off (requests go to a worker on arrival)"))
    print(f"{'fleet':>28} {'SLA met':>9} {'worker-s':>10} {'requests':>8} {'failed':>6} {'wall s':>7}")
    started = time.monotonic()
    found = oracle_schedule(trace, lambda n: simulation(trace, args, n), window_s=args.window_s,
                            ttft_sla=args.ttft, itl_sla=args.itl, startup_s=args.startup_s,
                            max_workers=args.max_workers)
    oracle = row("oracle (search)", found.result, args, started)
    print(f"{'':>28} workers per window: {' '.join(map(str, found.schedule))} ({found.trials} trials)")
    peak = max(found.schedule, default=1)
    fixed: list[tuple[int, Row]] = []
    if args.fixed:
        fixed = [(n, run(f"fixed {n}", trace, args, n)) for n in args.fixed]
    else:  # from the oracle's peak: down while 99% holds, or up until it does
        n = peak
        fixed.append((n, run(f"fixed {n}", trace, args, n)))
        step = -1 if fixed[-1][1].attainment >= 0.99 else 1
        while 1 <= n + step <= args.max_workers:
            n += step
            fixed.append((n, run(f"fixed {n}", trace, args, n)))
            if (fixed[-1][1].attainment >= 0.99) != (step == -1):
                break
    planned = [run(f"planner {predictor} burst {ratio:g}", trace, args, 1,
                   planner_controller(args, perf, predictor, ratio))
               for ratio in args.burst_ratios for predictor in args.predictors]
    burst_sizes = [n + args.bound_extra for n in found.schedule]
    bounds = [bound(trace, args, burst_sizes, r) for r in args.bound_reserves]
    best = min((r for n, r in fixed if r.attainment >= 0.99), key=lambda r: r.worker_seconds, default=None)
    print(f"\ntargets: >= 99% of windows; <= 1.10x the oracle's worker-seconds; fewer than the best "
          f"fixed fleet ({best.name + f', {best.worker_seconds:.0f}' if best else 'none met 99%'})")
    for r in planned + bounds:
        vs_fixed = f"{r.worker_seconds / best.worker_seconds:.2f}x best fixed" if best else "no fixed met 99%"
        ratio = r.worker_seconds / oracle.worker_seconds
        print(f"{r.name:>28}: {r.attainment:6.1%} of windows, {ratio:.2f}x the oracle, {vs_fixed}")


if __name__ == "__main__":
    main()
