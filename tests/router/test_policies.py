"""Policy registry and each built-in policy on hand-made snapshots."""

from __future__ import annotations

import argparse
import random
from collections import Counter

import pytest

from kvflow.router.blocks import OverlapScores
from kvflow.router.config import KvRouterConfig, add_router_args, config_from_args
from kvflow.router.errors import UnknownWorkerError
from kvflow.router.load import WorkerLoad
from kvflow.router.policies import (
    RouterPolicy,
    RoutingSnapshot,
    build_router_policy,
    register_router_policy,
    router_policy_names,
)


def snapshot(**kw: object) -> RoutingSnapshot:
    loads = {1: WorkerLoad(1, decode_blocks=4), 2: WorkerLoad(2, decode_blocks=1),
             3: WorkerLoad(3, prefill_tokens=64)}
    base: dict = {"num_tokens": 64, "loads": loads}
    base.update(kw)
    return RoutingSnapshot(**base)


def policy(name: str) -> RouterPolicy:
    return build_router_policy(KvRouterConfig(policy=name, block_size=16))


def test_builtin_names() -> None:
    assert router_policy_names() == ["direct", "kv", "least_loaded", "random", "round_robin"]


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="least_loaded"):
        policy("fastest")


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(AssertionError, match="twice"):
        register_router_policy("kv")(object)


def test_kv_policy_uses_overlap_and_load() -> None:
    # 4 request blocks; decode blocks weigh 0.1. Costs: w1 = 4 + 0.1 * 4 = 4.4,
    # w2 = (4-3) + 0.1 * 1 = 1.1, w3 = 4 + 4 queued = 8.
    choice = policy("kv").select(snapshot(overlaps=OverlapScores({2: 3})), random.Random(0))
    assert choice.worker_id == 2
    assert choice.costs == pytest.approx({1: 4.4, 2: 1.1, 3: 8.0})
    terms = policy("kv").terms(snapshot(overlaps=OverlapScores({2: 3})))  # type: ignore[attr-defined]
    assert terms[2].saved == 3.0 and terms[3].wait == 4.0


def test_least_loaded_ignores_overlap() -> None:
    # Loads: w1 = 4, w2 = 1, w3 = 64/16 = 4.
    choice = policy("least_loaded").select(snapshot(overlaps=OverlapScores({1: 4})),
                                           random.Random(0))
    assert choice.worker_id == 2 and choice.costs == {1: 4.0, 2: 1.0, 3: 4.0}


def test_round_robin_cycles_in_worker_order() -> None:
    rr = policy("round_robin")
    picks = [rr.select(snapshot(decisions_made=i), random.Random(0)).worker_id for i in range(6)]
    assert picks == [1, 2, 3, 1, 2, 3]


def test_random_covers_every_worker() -> None:
    rng = random.Random(5)
    picks = Counter(policy("random").select(snapshot(), rng).worker_id for _ in range(300))
    assert set(picks) == {1, 2, 3} and min(picks.values()) > 60


def test_direct_needs_a_named_available_worker() -> None:
    direct = policy("direct")
    assert direct.select(snapshot(pinned_worker=3), random.Random(0)).worker_id == 3
    with pytest.raises(UnknownWorkerError, match="named none"):
        direct.select(snapshot(), random.Random(0))
    with pytest.raises(UnknownWorkerError, match="not available"):
        direct.select(snapshot(pinned_worker=9), random.Random(0))


def test_config_validation_messages() -> None:
    with pytest.raises(ValueError, match="block_size=0"):
        KvRouterConfig(block_size=0)
    with pytest.raises(ValueError, match="max_decode_fraction"):
        KvRouterConfig(max_decode_fraction=1.5)


def test_cli_flags_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_router_args(parser)
    assert config_from_args(parser.parse_args([])) == KvRouterConfig()
    ns = parser.parse_args(["--router-policy", "round_robin", "--router-block-size", "32",
                            "--router-temperature", "0.5", "--no-router-use-kv-events",
                            "--router-max-active-requests", "8"])
    cfg = config_from_args(ns)
    assert (cfg.policy, cfg.block_size, cfg.temperature, cfg.use_kv_events,
            cfg.max_active_requests) == ("round_robin", 32, 0.5, False, 8)
    with pytest.raises(SystemExit):
        parser.parse_args(["--router-policy", "nope"])
