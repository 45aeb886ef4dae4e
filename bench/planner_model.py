"""Planner model accuracy: steady traffic on a fixed fleet, the simulator's ITL against the model's.

    .venv/bin/python bench/planner_model.py [--rates 1 3 5 7 8] [--workers 1 3] [--duration-s 300]

For each fleet size and per-worker rate, a burst-free day of constant rate (the bench's
mix: log-uniform ISL 200-3000 and OSL 50-300, shared prefixes) runs on simulated mocker
workers (bench/planner.py's timing) with the fleet held fixed. The simulator's own
per-interval observations (what the planner would see) are pooled, request-weighted, into
one Load, and the model's ITL p90 for that fleet and load is compared with the p90 of the
requests' ITLs measured in the simulator (those arriving after a warm-up and before the
cool-down), with and without the uncached prompt tokens' distribution (`Load.uncached`;
without it, the model takes the mean prompt's prefill time).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from planner import TIMING

from kvflow.engines.mocker.timing import TimingModel
from kvflow.planner.model import Fleet, Load, cv2, estimate, merge_shares
from kvflow.planner.observe import Observation
from kvflow.planner.perf import PerfModel
from kvflow.replay.report import percentile
from kvflow.replay.sim import SimEngine, Simulation
from kvflow.replay.trace import synthetic_day


def pooled(observations: list[Observation]) -> Load:
    """The observations as one load: request-weighted shape, the rate over their span."""
    n = sum(o.requests for o in observations)
    def mean(value) -> float:
        return sum(o.requests * value(o) for o in observations) / n
    isl = mean(lambda o: o.load.isl)
    uncached = merge_shares([(o.requests, o.load.uncached) for o in observations if o.load.uncached])
    return Load(n / sum(o.interval_s for o in observations), isl, mean(lambda o: o.load.osl),
                mean(lambda o: o.load.cached_fraction), cv2(mean(lambda o: o.load.isl_square), isl), uncached)


def probe(workers: int, rate: float, args: argparse.Namespace, perf: PerfModel) -> str:
    day = args.duration_s
    trace = synthetic_day(seed=args.seed, day_s=day, mean_rate=rate * workers, peak_ratio=1.0, bursts=0)
    seen: list[Observation] = []
    result = Simulation(trace, workers=workers, timing=TimingModel(TIMING), interval_s=1.0,
                        engine=SimEngine(startup_s=10.0),
                        controller=lambda now, obs: seen.append(obs) and None).run()
    lo, hi = args.warmup_s, day - args.warmup_s
    itls = [r.itl_s for r in result.results if lo < r.arrival_s < hi and r.output_tokens > 1]
    load = pooled([o for o in seen if lo < o.at_s <= hi])
    fleet = Fleet(aggregated=workers)
    with_shares = estimate(fleet, load, perf)[1]
    without = estimate(fleet, dataclasses.replace(load, uncached=()), perf)[1]
    p90 = percentile(itls, 90)
    return (f"{workers:7d} {load.rate / workers:8.2f} {load.cached_fraction:6.3f} "
            f"{statistics.mean(itls) * 1e3:8.1f} {p90 * 1e3:8.1f} {without * 1e3:9.1f} {p90 / without:6.2f} "
            f"{with_shares * 1e3:9.1f} {p90 / with_shares:6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", type=float, nargs="+", default=[1, 3, 5, 7, 8], help="req/s per worker")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    p.add_argument("--duration-s", type=float, default=300.0)
    p.add_argument("--warmup-s", type=float, default=30.0, help="left out at each end")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    perf = PerfModel.from_timing(TimingModel(TIMING))
    print(f"{'workers':>7} {'req/s/w':>8} {'cached':>6} {'sim mean':>8} {'sim p90':>8} "
          f"{'mean-pfx':>9} {'ratio':>6} {'buckets':>9} {'ratio':>6}   (ITL ms; ratio = sim p90 / model p90)")
    for workers in args.workers:
        for rate in args.rates:
            print(probe(workers, rate, args, perf), flush=True)


if __name__ == "__main__":
    main()
