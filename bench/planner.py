"""Planner benchmark: a synthetic day on simulated mocker workers — planner vs fixed fleets vs an oracle.

    .venv/bin/python bench/planner.py [--day-s 1200] [--mean-rate 6] [--seed 0]

The day (diurnal rate with a trough, a peak and bursts, mixed ISL/OSL) is compressed
into --day-s seconds of virtual time and run by kvflow.replay.sim (the real engine
core, the mocker's timing model, a virtual clock). New workers serve after
--startup-s. Each run reports SLA attainment (share of --window-s windows whose
TTFT p90 and ITL p90 meet the targets) and worker-seconds held. Baselines in the same
run: every fixed fleet size (the smallest meeting >= 99% of windows is "best fixed"),
and an oracle that knows the trace: each interval it sizes the fleet for the busiest
stretch of the coming interval plus start-up time, with no hysteresis.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from kvflow.engines.mocker.timing import TimingModel, TimingParams
from kvflow.planner.decide import Bounds, Rules, Sla, choose
from kvflow.planner.model import Fleet, Load
from kvflow.planner.observe import Observation
from kvflow.planner.perf import PerfModel
from kvflow.planner.planner import Planner
from kvflow.replay.report import attainment, windows
from kvflow.replay.sim import SimEngine, Simulation
from kvflow.replay.trace import TraceRequest, synthetic_day

oracle_timeline: list[tuple[float, int]] = []  # the oracle's sizes: the fixed sweep starts at its peak
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


def run(name: str, trace: list[TraceRequest], args: argparse.Namespace, workers: int,
        controller=None) -> Row:
    started = time.monotonic()
    sim = Simulation(trace, workers=workers, timing=TimingModel(TIMING), interval_s=args.interval_s,
                     engine=SimEngine(startup_s=args.startup_s), controller=controller)
    result = sim.run()
    stats = windows(result.results, args.window_s, args.ttft, args.itl)
    failed = sum(1 for r in result.results if r.error)
    row = Row(name, attainment(stats), result.worker_seconds, len(result.results), failed,
              time.monotonic() - started)
    print(f"{row.name:>16} {row.attainment:9.1%} {row.worker_seconds:12.0f} {row.requests:8d} "
          f"{row.failed:6d} {row.wall_s:7.1f}", flush=True)
    return row


def rules(args: argparse.Namespace, **kw: object) -> Rules:
    base = {"sla": Sla(args.ttft * args.margin, args.itl * args.margin),
            "bounds": Bounds(1, args.max_workers), "headroom": args.headroom,
            "scale_down_intervals": args.scale_down_intervals, "cooldown_s": args.cooldown_s}
    return Rules(**{**base, **kw})  # type: ignore[arg-type]


def planner_controller(args: argparse.Namespace, perf: PerfModel, start: int):
    planner = Planner(rules(args), perf, Fleet(aggregated=start), predictor=args.predictor)

    def control(now: float, obs: Observation) -> int:
        return planner.step(now, obs).target.aggregated
    return control


def oracle_controller(args: argparse.Namespace, perf: PerfModel, trace: list[TraceRequest]):
    oracle_rules = rules(args, headroom=0.0)

    def control(now: float, obs: Observation) -> int:
        oracle_timeline.append((now, need := 1))
        horizon = now + args.startup_s + args.interval_s
        for start in range(int(now), int(horizon), max(int(args.interval_s // 2), 1)):
            window = [r for r in trace if start <= r.arrival_s < start + args.interval_s]
            if window:
                load = Load(len(window) / args.interval_s, sum(r.input_length for r in window) / len(window),
                            sum(r.output_length for r in window) / len(window))
                need = max(need, choose(load, perf, oracle_rules)[0].fleet.aggregated)
        oracle_timeline[-1] = (now, need)
        return need
    return control


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--day-s", type=float, default=1200.0)
    p.add_argument("--mean-rate", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-s", type=float, default=10.0)
    p.add_argument("--interval-s", type=float, default=5.0)
    p.add_argument("--window-s", type=float, default=30.0)
    p.add_argument("--ttft", type=float, default=1.0, help="TTFT p90 target, s")
    p.add_argument("--itl", type=float, default=0.04, help="ITL p90 target, s")
    p.add_argument("--margin", type=float, default=0.8, help="the planner aims at margin x the SLA")
    p.add_argument("--headroom", type=float, default=0.15)
    p.add_argument("--scale-down-intervals", type=int, default=6)
    p.add_argument("--cooldown-s", type=float, default=30.0)
    p.add_argument("--predictor", default="kalman")
    p.add_argument("--max-workers", type=int, default=12)
    p.add_argument("--fixed", type=int, nargs="*",
                   help="fixed fleet sizes to run (default: from the oracle's peak, down to the smallest "
                        "meeting 99%% of windows)")
    args = p.parse_args()
    trace = synthetic_day(seed=args.seed, day_s=args.day_s, mean_rate=args.mean_rate)
    perf = PerfModel.from_timing(TimingModel(TIMING))
    print(f"synthetic day: {len(trace)} requests over {args.day_s:.0f}s virtual; SLA TTFT p90 <= "
          f"{args.ttft}s, ITL p90 <= {args.itl * 1e3:.0f}ms per {args.window_s:.0f}s window")
    print(f"{'fleet':>16} {'SLA met':>9} {'worker-s':>12} {'requests':>8} {'failed':>6} {'wall s':>7}")
    oracle = run("oracle", trace, args, 1, oracle_controller(args, perf, trace))
    peak = max(n for _, n in oracle_timeline) if oracle_timeline else 1
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
    planned = run(f"planner ({args.predictor})", trace, args, 1, planner_controller(args, perf, 1))
    best = min((row for n, row in fixed if row.attainment >= 0.99), key=lambda r: r.worker_seconds,
               default=None)
    print(f"\nplanner: SLA met in {planned.attainment:.1%} of windows (target >= 99%); worker-seconds "
          f"{planned.worker_seconds / oracle.worker_seconds:.2f}x the oracle's (target <= 1.10x)")
    if best is not None:
        print(f"best fixed fleet meeting 99%: {best.name}, {best.worker_seconds:.0f} worker-s; planner uses "
              f"{planned.worker_seconds / best.worker_seconds:.2f}x of it (target < 1.00x)")
    else:
        print("no fixed fleet in the sweep met 99% of windows")


if __name__ == "__main__":
    main()
