"""Where the planner's worker-seconds go: bench/planner.py's day, one reserve, second by second.

    .venv/bin/python bench/planner_trace.py --seed 0 --burst-ratio 1.75 [--oracle 1 1 2 ...]

Runs the planner (Kalman predictor, 1 s interval, bench/planner.py's defaults otherwise)
on the synthetic day and, at every decision, also asks `choose` what fleet the
prediction alone would want (no burst reserve) and what it would want without the
headroom either. Per 60 s window it splits the worker-seconds held into
  raw       the fleet the predicted rate needs (no headroom, no reserve),
  headroom  what --headroom adds to that,
  reserve   what the burst reserve (burst ratio x baseline) adds,
  hold      the fleet set over the fleet wanted now (scale-down votes, cool-down, and the
            largest fleet wanted over the votes),
  drain     workers still draining,
and gives, apart (a part of the above, not added), the worker-seconds of workers starting
(asked for, not yet serving), by the window they were asked in. With --oracle (the
oracle's workers per window, as bench/planner.py prints them) it lists the oracle's
worker-seconds per window (size x window); without it, it runs the oracle search (a minute).
It also counts scale-ups by the term that set the size (the reserve where the prediction
alone wants fewer workers), and lists each burst's
onset: the fleet set and the workers ready (serving or draining) when it began, against the
oracle's size for the window it began in. What a run meets is mostly decided there: a
worker asked for after the onset serves --startup-s later (docs/planner.md).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import planner as bench

from kvflow.engines.mocker.timing import TimingModel
from kvflow.planner.decide import choose
from kvflow.planner.model import Fleet
from kvflow.planner.observe import Observation
from kvflow.planner.perf import PerfModel
from kvflow.planner.planner import Planner
from kvflow.replay.oracle import oracle_schedule
from kvflow.replay.report import attainment, windows
from kvflow.replay.trace import synthetic_bursts, synthetic_day

PARTS = ("raw", "headroom", "reserve", "hold", "drain")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--burst-ratio", type=float, default=1.75)
    p.add_argument("--oracle", type=int, nargs="*", help="the oracle's workers per window (else searched)")
    a = p.parse_args()
    args = argparse.Namespace(day_s=1200.0, mean_rate=10.0, seed=a.seed, startup_s=10.0, interval_s=1.0,
                              window_s=60.0, ttft=1.0, itl=0.04, margin=1.0, headroom=0.15, baseline_s=120.0,
                              hold_active=0, hold_prefill_tokens=0, hold_timeout_s=60.0, backlog_drain_s=0.0,
                              scale_down_intervals=3, cooldown_s=15.0, max_scale_down_step=8, max_workers=12)
    trace = synthetic_day(seed=a.seed, day_s=args.day_s, mean_rate=args.mean_rate)
    perf = PerfModel.from_timing(TimingModel(bench.TIMING))
    rules = bench.rules(args, a.burst_ratio)
    bare = dataclasses.replace(rules, burst_ratio=0.0)
    raw = dataclasses.replace(bare, headroom=0.0)
    planner = Planner(rules, perf, Fleet(aggregated=1), predictor="kalman", settle_s=args.startup_s,
                      baseline_s=args.baseline_s)
    steps: list[dict[str, float]] = []
    ups: Counter[str] = Counter()

    def control(now: float, obs: Observation) -> int:
        d = planner.step(now, obs)
        if d.predicted is not None and d.chosen is not None and d.planned is not None:
            wants = [choose(d.predicted, perf, r, planner.calib)[0].fleet.workers for r in (bare, raw)]
            steps.append({"t": now, "target": d.target.workers, "best": d.chosen.fleet.workers,
                          "bare": wants[0], "raw": wants[1]})
            if d.action == "scale_up":  # the reserve set it when the prediction alone wants fewer
                by_reserve = wants[0] < d.chosen.fleet.workers
                ups["reserve" if by_reserve else "predicted rate"] += 1
        return d.target.aggregated

    sim = bench.simulation(trace, args, 1, control)
    result = sim.run()
    stats = windows(result.results, args.window_s, args.ttft, args.itl)
    if a.oracle is None:
        a.oracle = oracle_schedule(trace, lambda n: bench.simulation(trace, args, n), window_s=args.window_s,
                                   ttft_sla=args.ttft, itl_sla=args.itl, startup_s=args.startup_s,
                                   max_workers=args.max_workers).schedule
    times = [t for t, _ in result.timeline]
    count = len(stats)
    split = {k: [0.0] * count for k in (*PARTS, "starting")}
    for s in steps:  # the decision at t holds until t + interval
        k = min(int((s["t"] - 1e-9) // args.window_s), count - 1)
        i = bisect.bisect_right(times, s["t"] + 0.5 * args.interval_s) - 1
        held = result.timeline[i][1] if i >= 0 else 0
        parts = (s["raw"], s["bare"] - s["raw"], s["best"] - s["bare"], s["target"] - s["best"],
                 held - s["target"])
        for name, v in zip(PARTS, parts, strict=True):
            split[name][k] += v * args.interval_s
    for w in sim.workers:
        k = min(int(w.started_s // args.window_s), count - 1)
        end = w.stopped_s if w.stopped_s is not None else result.end_s
        split["starting"][k] += max(0.0, min(w.ready_s, end) - w.started_s)
    print(f"seed {a.seed}, burst ratio {a.burst_ratio:g}: {attainment(stats):.1%} of windows, "
          f"{result.worker_seconds:.0f} worker-s; scale-ups by the term that set the size: "
          f"{dict(ups)}")
    print(f"{'window':>6} {'oracle':>6} " + " ".join(f"{n:>8}" for n in PARTS) + f" {'starting':>8}")
    for k in range(count):
        oracle = a.oracle[k] * args.window_s if k < len(a.oracle) else 0.0
        print(f"{k * args.window_s:6.0f} {oracle:6.0f} " + " ".join(f"{split[n][k]:8.0f}" for n in PARTS)
              + f" {split['starting'][k]:8.0f}" + ("" if stats[k].meets_sla else "  MISS"))
    total = sum(a.oracle) * args.window_s
    print(f"{'total':>6} {total:6.0f} " + " ".join(f"{sum(split[n]):8.0f}" for n in PARTS)
          + f" {sum(split['starting']):8.0f}")
    for begin, _ in synthetic_bursts(seed=a.seed, day_s=args.day_s):
        before = [s for s in steps if s["t"] <= begin]
        fleet_set = int(before[-1]["target"]) if before else 1
        ready = sum(1 for w in sim.workers
                    if w.ready_s <= begin and (w.stopped_s is None or w.stopped_s > begin))
        k = min(int(begin // args.window_s), count - 1)
        oracle = a.oracle[k] if k < len(a.oracle) else 0
        verdict = "met" if stats[k].meets_sla else "MISSED"
        print(f"burst at {begin:6.1f}s: fleet set {fleet_set}, ready {ready}; "
              f"window {k * args.window_s:.0f}s: oracle {oracle}, {verdict}")


if __name__ == "__main__":
    main()
