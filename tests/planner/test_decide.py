"""Planner decisions against hand-computed cases: a flat performance model makes the math checkable.

Flat model: prefill of any prompt 0.1 s, any decode step 0.01 s, at most 64 sequences.
Aggregated n workers at rate r: per worker lam = r/n, rho = 0.1 lam,
TTFT p90 = 0.01 + 0.1 + 2.3 rho 0.1 / (2 (1 - rho)). A worker makes (1 - rho) / 0.01 decode
steps and lam prefill steps a second, so the mean ITL is 1 / (100 - 9 lam); the p90 ITL is that
at lam' = lam + 1.28 sqrt(lam / L), L = OSL x mean ITL (OSL 100 here). Per worker:
lam 5 -> lam' 7.123, ITL 27.86 ms; lam 6 -> 8.126, 37.23 ms; lam 6.25 -> 8.367, 40.48 ms;
lam 7.5 -> 9.498, 68.90 ms; lam 9 -> lam' over 9.5 (rho 0.95): infeasible.
"""

from __future__ import annotations

import dataclasses

import pytest

from kvflow.planner.decide import Bounds, PlanState, Rules, Sla, choose, plan_step, planned_load
from kvflow.planner.model import Fleet, Load, estimate
from kvflow.planner.perf import PerfModel

FLAT = PerfModel([16, 16384], [0.1, 0.1], [1, 256], [128, 8192], [[0.01, 0.01], [0.01, 0.01]],
                 max_batch=64, kv_transfer_bytes_per_s=1e12, kv_bytes_per_token=1e3)
SLA = Sla(ttft_s=0.3, itl_s=0.038)


def rules(**kw) -> Rules:
    base = {"sla": SLA, "bounds": Bounds(min_workers=1, max_workers=8), "headroom": 0.0,
            "scale_down_intervals": 2, "cooldown_s": 10.0}
    return Rules(**{**base, **kw})


def test_estimates_match_the_hand_computed_queueing_formulas() -> None:
    ttft, itl = estimate(Fleet(aggregated=2), Load(10, 512, 100), FLAT)
    # lam 5: mean ITL 1/55, L = 100/55 s, lam' = 5 + 1.28 sqrt(5 x 55 / 100) = 7.1226.
    assert itl == pytest.approx(1 / (100 - 9 * (5 + 1.28 * (5 * 55 / 100) ** 0.5)))
    assert itl == pytest.approx(0.02786, abs=1e-5)
    assert ttft == pytest.approx(0.01 + 0.1 + 2.3 * 0.5 * 0.1 / 1.0)
    assert estimate(Fleet(aggregated=1), Load(10, 512, 100), FLAT) == (float("inf"), float("inf"))
    # 1P+1D at 5 req/s: prefill rho 0.5; decode alone, a flat step: ITL 0.01 at any load;
    # TTFT adds transfer + one step.
    ttft, itl = estimate(Fleet(prefill=1, decode=1), Load(5, 512, 100), FLAT)
    assert itl == pytest.approx(0.01)
    assert ttft == pytest.approx(0.1 + 2.3 * 0.5 * 0.1 / 1.0 + 512 * 1e3 / 1e12 + 0.01)


def test_the_mean_prefill_time_is_taken_over_the_uncached_tokens_distribution() -> None:
    # Prefill 0.05 s up to 512 tokens (a step's floor), then 0.1 s more per 512 tokens. Uncached
    # tokens: half in (0, 256] (centre 128), half in (256, 1024] (centre 640); their mean 384 is
    # scaled to the known 512 (isl 512, nothing cached): points 170.67 and 853.33, prefill
    # 0.05 and 0.05 + 341.33 x 0.1 / 512 = 0.11667, so E[p] = 0.08333 (the mean prompt alone:
    # 0.05) and E[p^2] = (0.0025 + 0.013611) / 2, cv^2 = 0.16.
    # Two workers at 10 req/s: lam 5, rho 5 x 0.08333 = 0.41667; the mean ITL is
    # 1 / ((1 - rho) / 0.01 + 5) = 1 / 63.333; the p90 at lam' = 5 + 1.28 sqrt(5 x 1.16 x 63.333 /
    # 100) = 7.4532: 1 / (100 - 7.3333 lam') = 22.05 ms (the mean prompt's 0.05 s: 14.33 ms).
    floor = dataclasses.replace(FLAT, prefill_isl=[16, 512, 1024], prefill_s=[0.05, 0.05, 0.15])
    uncached = ((256.0, 0.5), (1024.0, 0.5), (float("inf"), 0.0))
    load = Load(10, 512, 100, uncached=uncached)
    p = (0.05 + 0.05 + 341.3333 * 0.1 / 512) / 2
    assert p == pytest.approx(0.083333, abs=1e-6)
    lam = 5 + 1.28 * (5 * 1.16 * 63.3333 / 100) ** 0.5
    ttft, itl = estimate(Fleet(aggregated=2), load, floor)
    assert itl == pytest.approx(1 / (100 - 7.33333 * lam), rel=1e-4)
    assert itl == pytest.approx(0.02205, abs=1e-5)
    assert ttft == pytest.approx(0.01 + p + 2.3 * 5 * p * p / (2 * (1 - 5 * p)), rel=1e-4)
    # Unknown distribution: the mean prompt's prefill, 0.05 s: rho 0.25, mean ITL 1/80, L 1.25 s,
    # lam' = 5 + 1.28 sqrt(5 / 1.25) = 7.56, p90 ITL 1 / (100 - 4 x 7.56) = 14.33 ms.
    assert estimate(Fleet(aggregated=2), Load(10, 512, 100), floor)[1] == pytest.approx(1 / 69.76)


def test_prompt_length_spread_widens_the_itl_p90_through_the_prefill_time_curve() -> None:
    # Prefill linear in tokens, 0.1 s at 512: the mean ITL at lam 5 is 1/55 as with FLAT.
    # ISL cv^2 0.25: one sd is 256 tokens, prefill 0.15 s, so the prefill time's cv^2 is
    # (0.05 / 0.1)^2 = 0.25 and lam' = 5 + 1.28 sqrt(5 x 1.25 x 55 / 100) = 7.3732.
    linear = dataclasses.replace(FLAT, prefill_isl=[0, 1024], prefill_s=[0.0, 0.2])
    _, itl = estimate(Fleet(aggregated=2), Load(10, 512, 100, isl_cv2=0.25), linear)
    assert itl == pytest.approx(1 / (100 - 9 * (5 + 1.28 * (5 * 1.25 * 55 / 100) ** 0.5)))
    assert itl == pytest.approx(0.02973, abs=1e-5)
    assert estimate(Fleet(aggregated=2), Load(10, 512, 100), linear)[1] == pytest.approx(0.02786, abs=1e-5)
    # A flat prefill takes as long for any prompt: the spread of lengths changes nothing.
    assert estimate(Fleet(aggregated=2), Load(10, 512, 100, isl_cv2=0.25), FLAT)[1] == \
        pytest.approx(0.02786, abs=1e-5)


def test_chooses_the_cheapest_fleet_meeting_the_sla() -> None:
    best, _ = choose(Load(10, 512, 100), FLAT, rules())
    assert best.fleet == Fleet(aggregated=2) and best.meets  # n=1 cannot keep up
    best, _ = choose(Load(30, 512, 100), FLAT, rules())
    # n=4: lam 7.5, ITL 68.9 ms > 38; n=5: lam 6, ITL 37.2 ms (meets), TTFT 0.2825
    assert best.fleet == Fleet(aggregated=5)


def test_headroom_plans_for_more_than_the_prediction() -> None:
    best, _ = choose(Load(10, 512, 100), FLAT, rules(headroom=0.25))  # 12.5 req/s
    assert best.fleet == Fleet(aggregated=3)  # n=2: lam 6.25, ITL 40.5 ms > 38


def test_disaggregated_split_follows_the_mix() -> None:
    prefill_heavy = choose(Load(18, 4096, 4), FLAT, rules(mode="disaggregated"))[0].fleet
    decode_heavy = choose(Load(4, 64, 2000), FLAT, rules(mode="disaggregated"))[0].fleet
    assert prefill_heavy.prefill > prefill_heavy.decode
    assert decode_heavy.decode >= decode_heavy.prefill


def test_bounds_and_gpu_budget_cap_the_fleet() -> None:
    best, _ = choose(Load(100, 512, 100), FLAT, rules(bounds=Bounds(max_workers=8)))
    assert best.fleet == Fleet(aggregated=8) and not best.meets  # closest within bounds
    best, _ = choose(Load(100, 512, 100), FLAT,
                     rules(bounds=Bounds(max_workers=8, gpu_budget=6, gpus_per_worker=2)))
    assert best.fleet == Fleet(aggregated=3) and best.gpus == 6
    best, _ = choose(Load(0.1, 512, 100), FLAT, rules(bounds=Bounds(min_workers=2, max_workers=8)))
    assert best.fleet == Fleet(aggregated=2)


def test_scale_up_is_immediate() -> None:
    decision, state = plan_step(PlanState(Fleet(aggregated=2)), 100.0, Load(30, 512, 100), FLAT, rules())
    assert decision.action == "scale_up" and decision.target == Fleet(aggregated=5)
    assert state.fleet == Fleet(aggregated=5) and state.last_change_s == 100.0
    assert "misses the SLA" in decision.reason


def test_scale_down_waits_for_votes_and_cooldown_then_steps_by_one() -> None:
    r = rules(scale_down_intervals=2, cooldown_s=10.0)
    state = PlanState(Fleet(aggregated=5), last_change_s=0.0)
    low = Load(10, 512, 100)  # 2 would do
    d1, state = plan_step(state, 5.0, low, FLAT, r)
    assert d1.action == "hold" and "waiting (1/2" in d1.reason
    d2, state = plan_step(state, 8.0, low, FLAT, r)
    assert d2.action == "hold" and "cool-down" in d2.reason  # 2 votes, but only 8 s since the change
    d3, state = plan_step(state, 11.0, low, FLAT, r)
    assert d3.action == "scale_down" and d3.target == Fleet(aggregated=4)
    d4, state = plan_step(state, 12.0, low, FLAT, r)
    assert d4.action == "hold"  # cooling down again after that change


def test_scale_down_accounts_for_the_load_the_rest_absorbs() -> None:
    # At 18 req/s, 3 workers: lam 6, ITL 37.2 ms (meets); 2 workers: lam 9, infeasible.
    r = rules(scale_down_intervals=1, cooldown_s=0.0)
    decision, _ = plan_step(PlanState(Fleet(aggregated=4)), 50.0, Load(18, 512, 100), FLAT, r)
    assert decision.target == Fleet(aggregated=3)
    decision, _ = plan_step(PlanState(Fleet(aggregated=3)), 50.0, Load(18, 512, 100), FLAT, r)
    assert decision.action == "hold"


def test_no_metrics_holds_and_says_so() -> None:
    state = PlanState(Fleet(aggregated=6), 0.0, down_votes=1)
    decision, after = plan_step(state, 100.0, None, FLAT, rules())
    assert decision.action == "hold" and decision.target == Fleet(aggregated=6)
    assert "never scaling down blind" in decision.reason and after.down_votes == 0


def test_split_change_when_the_mix_moves() -> None:
    r = rules(mode="disaggregated", scale_down_intervals=1, cooldown_s=0.0)
    start = choose(Load(18, 4096, 4), FLAT, r)[0].fleet
    decision, _ = plan_step(PlanState(start), 10.0, Load(4, 64, 2000), FLAT, r)
    assert decision.target.decode > start.decode and decision.action in ("resplit", "scale_down")


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        Rules(mode="both")


def test_the_operator_s_planner_command_parses_as_a_planner_config() -> None:
    import argparse

    from kvflow.operator.reconcile import desired_state
    from kvflow.planner.config import PlannerConfig
    from kvflow.runtime.config import add_config_args, config_from_args
    from kvflow.testing.k8s import example_resource

    objects = [o for o in desired_state(example_resource("planner")).objects
               if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-planner")]
    command = objects[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["kvflow", "planner"]
    parser = argparse.ArgumentParser()
    add_config_args(parser, PlannerConfig)
    config = config_from_args(PlannerConfig, "planner", parser.parse_args(command[2:]))
    assert config.connector == "kubernetes" and config.apply and config.mode == "disaggregated"
    assert "prefill=" in config.k8s_scale_targets and "decode=" in config.k8s_scale_targets


def test_scale_down_goes_to_the_largest_fleet_the_voting_intervals_wanted() -> None:
    # Best fleets on the flat model: 10 req/s -> 2 (1 worker: rho 1); 18 req/s -> 3 (2: lam 9).
    r = rules(scale_down_intervals=3, cooldown_s=0.0, max_scale_down_step=8)
    state = PlanState(Fleet(aggregated=6))
    for t, rate in ((5.0, 10.0), (10.0, 18.0)):
        decision, state = plan_step(state, t, Load(rate, 512, 100), FLAT, r)
        assert decision.action == "hold"
    assert state.down_to == Fleet(aggregated=3)
    decision, state = plan_step(state, 15.0, Load(10, 512, 100), FLAT, r)
    assert decision.target == Fleet(aggregated=3)  # not 2: the 18 req/s interval wanted 3
    assert state.down_to is None and state.down_votes == 0
    one_step = rules(scale_down_intervals=1, cooldown_s=0.0, max_scale_down_step=1)
    assert plan_step(PlanState(Fleet(aggregated=6)), 5.0, Load(10, 512, 100), FLAT,
                     one_step)[0].target == Fleet(aggregated=5)


def test_a_vote_that_wants_the_current_fleet_resets_the_floor() -> None:
    r = rules(scale_down_intervals=2, cooldown_s=0.0, max_scale_down_step=8)
    state = PlanState(Fleet(aggregated=3))
    _, state = plan_step(state, 5.0, Load(10, 512, 100), FLAT, r)  # wants 2
    _, state = plan_step(state, 10.0, Load(18, 512, 100), FLAT, r)  # wants 3: the current fleet
    assert state.down_votes == 0 and state.down_to is None


def test_burst_reserve_sizes_for_a_multiple_of_the_baseline_not_of_a_burst() -> None:
    r = rules(burst_ratio=2.0)
    assert choose(Load(10, 512, 100), FLAT, r)[0].fleet == Fleet(aggregated=2)  # no baseline yet
    # Baseline 9 req/s: planned max(10, 2 x 9) = 18 req/s -> 3 workers (2 would be at lam 9).
    assert planned_load(Load(10, 512, 100), r, baseline=9.0).rate == 18.0
    assert choose(Load(10, 512, 100), FLAT, r, baseline=9.0)[0].fleet == Fleet(aggregated=3)
    # During a burst of 30 req/s: max(30, 18) = 30 -> 5 workers, as without a reserve.
    assert choose(Load(30, 512, 100), FLAT, r, baseline=9.0)[0].fleet == Fleet(aggregated=5)
    # Headroom multiplies the prediction only: max(10 x 1.25, 18) = 18.
    assert planned_load(Load(10, 512, 100), rules(headroom=0.25, burst_ratio=2.0), 9.0).rate == 18.0
    decision, _ = plan_step(PlanState(Fleet(aggregated=2)), 5.0, Load(10, 512, 100), FLAT, r, baseline=9.0)
    assert decision.action == "scale_up" and decision.target == Fleet(aggregated=3)
    assert decision.planned is not None and decision.planned.rate == 18.0
    with pytest.raises(ValueError, match="burst_ratio must be >= 0"):
        rules(burst_ratio=-1.0)


def test_the_burst_reserve_is_sized_in_the_baselines_request_shape() -> None:
    r = rules(burst_ratio=2.0)
    # Baseline 9 req/s: the reserve is 18 req/s in the baseline's shape, a load of its own.
    # OSL 100: 3 workers at lam 6 give 37.23 ms (as when the reserve raised the predicted rate).
    assert choose(Load(10, 512, 100), FLAT, r, baseline=9.0, shape=Load(0, 512, 100))[0].fleet == \
        Fleet(aggregated=3)
    # OSL 50 (shorter lives, so the prefills over one vary more): at lam 6 the mean ITL is
    # 1 / (100 - 54) = 21.74 ms, L = 50 / 46 = 1.087 s, lam' = 6 + 1.28 sqrt(6 / 1.087) = 9.007:
    # 1 / (100 - 81.06) = 52.8 ms misses. 4 workers, lam 4.5: mean 1 / 59.5, L = 0.8403 s,
    # lam' = 4.5 + 1.28 sqrt(4.5 / 0.8403) = 7.462: 1 / (100 - 67.16) = 30.45 ms; TTFT 0.204 s.
    best, _ = choose(Load(10, 512, 100), FLAT, r, baseline=9.0, shape=Load(0, 512, 50))
    assert best.fleet == Fleet(aggregated=4)
    # Its estimate is the reserve's, the load with less slack (the predicted 10 req/s at lam 2.5
    # would give 1 / (100 - 9 x 4.06) = 15.7 ms).
    assert best.itl_s == pytest.approx(1 / (100 - 9 * (4.5 + 1.28 * (4.5 * 59.5 / 50) ** 0.5)))
    assert best.itl_s == pytest.approx(0.03045, abs=1e-5)
    # A prediction whose last intervals happen to be short-lived (OSL 50) does not move the reserve,
    # sized in the baseline's OSL 100 (3 workers); folded into the predicted load's rate, the
    # reserve would have been 18 req/s at OSL 50: 4 workers.
    assert choose(Load(10, 512, 50), FLAT, r, baseline=9.0, shape=Load(0, 512, 100))[0].fleet == \
        Fleet(aggregated=3)
    assert choose(Load(10, 512, 50), FLAT, r, baseline=9.0)[0].fleet == Fleet(aggregated=4)
    # The prediction is still met in its own shape: a burst of 30 req/s at OSL 100 needs 5 (lam 6).
    assert choose(Load(30, 512, 100), FLAT, r, baseline=9.0, shape=Load(0, 512, 50))[0].fleet == \
        Fleet(aggregated=5)
    decision, _ = plan_step(PlanState(Fleet(aggregated=3)), 5.0, Load(10, 512, 100), FLAT, r,
                            baseline=9.0, shape=Load(0, 512, 50))
    assert decision.action == "scale_up" and decision.target == Fleet(aggregated=4)
    assert decision.planned is not None and decision.planned.rate == 10.0  # headroom 0, no reserve in it
    assert decision.reserve == Load(18.0, 512, 50)
    assert decision.current is not None and not decision.current.meets  # 3 workers miss the reserve


def test_held_requests_are_planned_for_over_the_drain_time() -> None:
    r = rules(backlog_drain_s=10.0)
    # 10 req/s + 80 held / 10 s = 18 req/s -> 3 workers (2 would be at lam 9).
    assert planned_load(Load(10, 512, 100), r, held=80).rate == 18.0
    assert choose(Load(10, 512, 100), FLAT, r, held=80)[0].fleet == Fleet(aggregated=3)
    decision, _ = plan_step(PlanState(Fleet(aggregated=2)), 5.0, Load(10, 512, 100), FLAT, r, held=80)
    assert decision.action == "scale_up" and decision.target == Fleet(aggregated=3)
    # Off by default: the same hold changes nothing.
    assert planned_load(Load(10, 512, 100), rules(), held=80).rate == 10.0
    with pytest.raises(ValueError, match="backlog_drain_s must be >= 0"):
        rules(backlog_drain_s=-1.0)
