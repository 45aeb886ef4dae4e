"""The Planner's loop state: calibration waits until a changed fleet has settled."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvflow.planner.decide import Bounds
from kvflow.planner.model import Fleet, Load, estimate
from kvflow.planner.observe import Observation
from kvflow.planner.planner import Planner
from kvflow.planner.service import decision_dict
from tests.planner.test_decide import FLAT, rules


def test_calibration_skips_intervals_while_a_changed_fleet_settles() -> None:
    planner = Planner(rules(), FLAT, Fleet(aggregated=1), settle_s=10.0)
    load = Load(10, 512, 100)
    decision = planner.step(100.0, Observation(100.0, 5.0, 50, load, 0.3, 0.02, ttft_bins=((0.3, 0.3, 50.0),),
                                               itl_bins=((0.02, 0.02, 50.0),)))
    assert decision.target == Fleet(aggregated=2)  # 1 worker cannot keep up (and is not calibrated on)
    # Settled from 100 + 10 (start-up) + 100 tokens x ITL p90 27.86 ms = 112.8 s.
    ttft, itl = estimate(Fleet(aggregated=2), load, FLAT)  # 0.225 s, 0.02786 s
    assert planner.calibrate_from == pytest.approx(110.0 + 100 * itl)
    # 50 requests, 45 at 2x the predicted TTFT and 5 at 3x; ITLs as predicted.
    ttfts, itls = ((2 * ttft, 2 * ttft, 45.0), (3 * ttft, 3 * ttft, 5.0)), ((itl, itl, 50.0),)
    planner.step(115.0, Observation(115.0, 5.0, 50, load, ttft_bins=ttfts, itl_bins=itls))  # too early
    assert planner.calib.levels == {"ttft": {}, "itl": {}}
    planner.step(120.0, Observation(120.0, 5.0, 50, load, ttft_bins=ttfts, itl_bins=itls))  # settled
    # 10 req/s on 2 workers: 5 per worker, level floor(log 5 / log 1.25) = 7; 50 requests pooled,
    # whose p90 (the 45th of 50) is 2x.
    assert planner.calib.levels["ttft"][7].total == 50.0 and planner.calib.levels["ttft"][7].p90 == 2.0
    assert planner.calib.levels["itl"][7].p90 == pytest.approx(1.0)
    assert planner.calib.factors(5.0, 5.0) == (pytest.approx(2.0), pytest.approx(1.0))


def test_calibration_pools_the_load_the_finished_requests_met() -> None:
    """Short intervals: each calibrates at the rate over the last request duration, not its own."""
    planner = Planner(rules(), FLAT, Fleet(aggregated=2), settle_s=0.0)
    shape = (512, 100)
    # Steady 10 req/s on 2 workers: a request lasts 0.225 + 100 x 27.86 ms = 3.01 s (predicted).
    done = ((0.03, 0.03, 10.0),)  # ten requests finish each interval
    for t in (1.0, 2.0, 3.0, 4.0):
        planner.step(t, Observation(t, 1.0, 10, Load(10.0, *shape), itl_bins=done))
    ttft, itl = estimate(Fleet(aggregated=2), Load(10.0, *shape), FLAT)
    assert planner.serve_s == pytest.approx(ttft + 100 * itl)
    assert planner.serve_s == pytest.approx(3.01, abs=0.01)
    # Then an interval of 4 requests. The requests finishing in it met the last 3.01 s of arrivals:
    # the intervals ending at 2, 3, 4 and 5 s, 34 requests in 4 s, 4.25 per worker (level 6).
    planner.step(5.0, Observation(5.0, 1.0, 4, Load(4.0, *shape), itl_bins=done))
    assert (planner.calib.level(5.0), planner.calib.level(4.25)) == (7, 6)
    assert planner.calib.levels["itl"][7].total == 40.0  # four intervals of 10 at 5 per worker
    assert planner.calib.levels["itl"][6].total == 10.0  # the last one: the 10 requests it finished


def test_calibration_skips_the_request_duration_after_a_burst_begins() -> None:
    # 8 workers, held there (bounds 8-8), 1 s intervals, burst ratio 2: 10 req/s, then 30.
    r = dataclasses.replace(rules(burst_ratio=2.0), bounds=Bounds(min_workers=8, max_workers=8))
    planner = Planner(r, FLAT, Fleet(aggregated=8), settle_s=0.0, baseline_s=20.0)
    done = ((0.02, 0.02, 10.0),)  # ten requests finish each interval

    def pooled() -> float:
        return sum(pool.total for pool in planner.calib.levels["itl"].values())
    for t in range(1, 21):
        planner.step(float(t), Observation(float(t), 1.0, 10, Load(10.0, 512, 100), itl_bins=done))
    assert pooled() == 200.0
    # The predicted request duration at 1.25 req/s per worker (rho 0.125): TTFT 0.11 + 2.3 x 0.0125 /
    # 1.75 = 0.12643 s; mean ITL 1 / 88.75, L = 1.1268 s, lam' = 1.25 + 1.28 sqrt(1.25 / 1.1268) =
    # 2.5982, ITL p90 1 / (100 - 23.384) = 13.052 ms: 0.12643 + 100 x 0.013052 = 1.4316 s.
    assert planner.serve_s == pytest.approx(1.4316, abs=1e-4)
    # t = 21: 30 is over 2 x 10 and 10 + 3 sqrt(10): a burst. Intervals starting before 21 + 1.4316
    # (those ending at 21, 22 and 23) are not pooled; from the one ending at 24 on they are.
    burst = Load(30.0, 512, 100)
    planner.step(21.0, Observation(21.0, 1.0, 30, burst, itl_bins=done))
    assert planner.burst_since == 20.0
    assert planner.calibrate_from == pytest.approx(22.4316, abs=1e-4)
    for t in (22.0, 23.0):
        planner.step(t, Observation(t, 1.0, 30, burst, itl_bins=done))
    assert pooled() == 200.0
    planner.step(24.0, Observation(24.0, 1.0, 30, burst, itl_bins=done))
    assert pooled() == 210.0


def test_the_baseline_is_the_median_rate_of_the_last_baseline_s() -> None:
    planner = Planner(rules(), FLAT, Fleet(aggregated=8), baseline_s=30.0)
    assert planner.baseline() == 0.0
    for i, rate in enumerate((20.0, 4.0, 5.0, 6.0, 30.0, 40.0)):  # every 10 s
        planner.step(10.0 * (i + 1), Observation(10.0 * (i + 1), 10.0, int(rate * 10), Load(rate, 512, 100)))
    # Kept: t = 40, 50, 60 (older than 60 - 30 dropped): rates 6, 30, 40 -> median 30.
    assert planner.baseline() == 30.0
    planner.step(70.0, Observation(70.0, 10.0, 50, Load(5.0, 512, 100)))
    assert planner.baseline() == 30.0  # 30, 40, 5 -> sorted 5, 30, 40


def test_a_burst_is_left_out_of_the_baseline_until_it_lasts_baseline_s() -> None:
    planner = Planner(rules(burst_ratio=2.0), FLAT, Fleet(aggregated=8), baseline_s=30.0)

    def step(at: float, rate: float) -> float:
        planner.step(at, Observation(at, 10.0, int(rate * 10), Load(rate, 512, 100)))
        return planner.baseline()
    assert [step(t, 10.0) for t in (10.0, 20.0, 30.0)] == [10.0, 10.0, 10.0]
    # 30 req/s is over 2 x 10: a burst from t = 30. Left out, the median stays 10 (counted, the
    # last 30 s would hold 10, 30, 30 at t = 50: a median of 30 and a reserve of 60 req/s).
    assert step(40.0, 30.0) == 10.0
    assert step(50.0, 30.0) == 10.0
    # At t = 60 it has lasted 30 s (baseline_s): the new normal.
    assert step(60.0, 30.0) == 30.0
    # A later burst (100 at t = 80) is left out again; 30 is the baseline.
    assert step(70.0, 30.0) == 30.0 and step(80.0, 100.0) == 30.0 and step(90.0, 30.0) == 30.0


def test_the_reserves_shape_is_pooled_over_the_baselines_intervals_bursts_left_out() -> None:
    planner = Planner(rules(burst_ratio=2.0), FLAT, Fleet(aggregated=8), baseline_s=30.0)
    assert planner.baseline_shape() is None

    def step(at: float, rate: float, osl: float) -> None:
        planner.step(at, Observation(at, 10.0, int(rate * 10), Load(rate, 512, osl)))
    step(10.0, 10.0, 300.0)
    step(20.0, 10.0, 100.0)
    step(30.0, 10.0, 200.0)
    step(40.0, 30.0, 50.0)  # a burst (over 2 x 10): left out, as from the baseline
    step(50.0, 5.0, 100.0)  # the burst has ended (its evidence: 50 ln(10 / 30) + 200 = 145 > 4.5)
    shape = planner.baseline_shape()
    # Kept at t = 50: (20, 50], the intervals ending at 30 and 50 (40 left out): 100 requests at
    # OSL 200 and 50 at OSL 100, request-weighted (100 x 200 + 50 x 100) / 150.
    assert shape is not None and shape.rate == 0.0 and shape.isl == 512.0
    assert shape.osl == pytest.approx(500 / 3)
    assert planner.baseline() == 10.0  # rates 10 and 5: the upper median
    assert planner.decisions[-1].reserve == dataclasses.replace(shape, rate=20.0)


def _baselines(planner: Planner, rates: list[tuple[float, float]], interval_s: float = 1.0) -> list[float]:
    out = []
    for at, rate in rates:
        planner.step(at, Observation(at, interval_s, round(rate * interval_s), Load(rate, 512, 100)))
        out.append(planner.baseline())
    return out


def test_a_burst_is_left_out_of_the_baseline_also_where_its_intervals_dip_under_the_ratio() -> None:
    # 1 s intervals, burst_ratio 2, baseline_s 20: 20 s at 10 req/s, then a 16 s burst whose
    # counts alternate 30 and 18 (mean 24, 2.4x), then 13 req/s.
    planner = Planner(rules(burst_ratio=2.0), FLAT, Fleet(aggregated=8), baseline_s=20.0)
    assert set(_baselines(planner, [(t, 10.0) for t in range(1, 21)])) == {10.0}
    burst = [(t, 30.0 if t % 2 else 18.0) for t in range(21, 37)]
    # At t = 21, 30 is over 2 x 10 and over 10 + 3 x sqrt(10) = 19.49: a burst begins. An 18 is under
    # 2 x 10, but the burst goes on: the evidence that it ended (per interval, count x ln(10 / mu)
    # - (10 - mu), mu the burst's mean rate so far; summed while positive) is at most 0.225 (the
    # first 18, mu = 30; later mu is 24-26 and an 18 adds under -1.2, a 30 under -8). Every interval
    # is left out; the baseline is the 10s left in the window. (Counted, as they were when only
    # rates over 2 x the baseline were left out, the 18s raised the median to 18 by t = 34, which
    # then let the 30s in, and it stayed 18 after the burst, where the traffic was 13.)
    assert set(_baselines(planner, burst)) == {10.0}
    # t = 37: 13 req/s, mu = 384 / 16 = 24: 13 ln(10/24) + 14 = 2.62 <= 4.5 (3^2 / 2), still left out.
    # t = 38: mu = 397 / 17 = 23.35: + 13 ln(10/23.35) + 13.35 = 2.33, 4.95 > 4.5: the burst has ended,
    # 13 is counted: window (18, 38] holds 10, 10, 13 -> 10; t = 39: 10, 13, 13 -> 13.
    assert _baselines(planner, [(37, 13.0), (38, 13.0), (39, 13.0)]) == [10.0, 10.0, 13.0]
    assert planner.burst_since is None


def test_a_rate_over_the_ratio_within_counting_noise_is_no_burst() -> None:
    # burst_ratio 1.5 at 4 req/s counted over 1 s: 7 is over 1.5 x 4 = 6 but not over 4 + 3 x sqrt(4)
    # = 10 (a Poisson count of 7 at a mean of 4 is 1.5 sd): counted, and after six of them in a 10 s
    # window (4 x 4, 6 x 7) the median (the 6th of 10) is 7. Left out as a burst, the median would
    # have stayed 4 until the run of 7s had lasted baseline_s.
    planner = Planner(rules(burst_ratio=1.5), FLAT, Fleet(aggregated=8), baseline_s=10.0)
    got = _baselines(planner, [(t, 4.0) for t in range(1, 11)] + [(t, 7.0) for t in range(11, 17)])
    assert got[9] == 4.0 and got[15] == 7.0
    assert planner.burst_since is None


def test_the_prompt_spread_is_predicted_from_the_mean_square_across_intervals() -> None:
    # Two intervals, each of one prompt length (cv^2 0), 1000 then 2000: the mean square
    # (1e6 + 4e6) / 2 over the mean 1500 squared gives cv^2 = 2.5 / 2.25 - 1 = 0.1111.
    planner = Planner(rules(), FLAT, Fleet(aggregated=2), calibrate=False)
    planner.step(1.0, Observation(1.0, 1.0, 10, Load(10.0, 1000, 100), 0.2, 0.02))
    decision = planner.step(2.0, Observation(2.0, 1.0, 10, Load(10.0, 2000, 100), 0.2, 0.02))
    assert decision.predicted.isl == 1500
    assert decision.predicted.isl_cv2 == pytest.approx(2.5 / 2.25 - 1)


def test_the_uncached_tokens_distribution_is_pooled_across_intervals() -> None:
    # Predicted: the mean of the last 4 intervals' shares (as the mean ISL): all in (0, 8], then
    # all in (8, inf) -> half and half. The load calibrated on (the arrivals over the last
    # request duration, 10 s: here all six intervals' 1 + 5 x 3 requests) weighs them by
    # requests: the 1-request interval is 1/16 of it.
    planner = Planner(rules(), FLAT, Fleet(aggregated=2), calibrate=False)
    low, high = ((8.0, 1.0), (float("inf"), 0.0)), ((8.0, 0.0), (float("inf"), 1.0))
    planner.serve_s = 10.0
    planner.step(1.0, Observation(1.0, 1.0, 1, Load(1.0, 4, 100, uncached=low)))
    decision = planner.step(2.0, Observation(2.0, 1.0, 3, Load(3.0, 100, 100, uncached=high)))
    assert decision.predicted.uncached == ((8.0, 0.5), (float("inf"), 0.5))
    for t in (3.0, 4.0, 5.0):
        decision = planner.step(t, Observation(t, 1.0, 3, Load(3.0, 100, 100, uncached=high)))
    assert decision.predicted.uncached == ((8.0, 0.0), (float("inf"), 1.0))  # the first has left
    last = Observation(6.0, 1.0, 3, Load(3.0, 100, 100, uncached=high))
    planner.step(6.0, last)
    met = planner._met_load(last)
    assert met.uncached == (pytest.approx((8.0, 1 / 16)), pytest.approx((float("inf"), 15 / 16)))


def test_a_decision_is_strict_json_with_infinity_as_null_at_any_depth() -> None:
    # One worker at 10 req/s cannot keep up on FLAT (rho 1): the current fleet's estimate, nested
    # in the decision, is infinite; the predicted load's open uncached bucket ends at infinity.
    planner = Planner(rules(), FLAT, Fleet(aggregated=1), calibrate=False)
    shares = ((8.0, 0.5), (float("inf"), 0.5))
    decision = planner.step(1.0, Observation(1.0, 1.0, 10, Load(10.0, 512, 100, uncached=shares)))
    plain = json.loads(json.dumps(decision_dict(decision), allow_nan=False))
    assert plain["predicted"]["uncached"] == [[8.0, 0.5], [None, 0.5]]
    assert plain["current"]["fleet"]["aggregated"] == 1
    assert plain["current"]["ttft_s"] is None and plain["current"]["itl_s"] is None
    assert plain["target"] == {"aggregated": 2, "prefill": 0, "decode": 0}
