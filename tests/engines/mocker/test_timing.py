"""Timing model: shape of prefill and decode costs, step composition, JSON profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import Scheduler, SchedulerConfig
from kvflow.engines.core.sequence import Sequence, StopRule
from kvflow.engines.mocker.timing import TimingModel, TimingParams, load_profile

MODEL = TimingModel()


def test_ttft_grows_with_uncached_prompt_not_with_cached_prefix() -> None:
    t1k = MODEL.prefill_time(1000)
    t2k = MODEL.prefill_time(2000)
    t1k_after_1k_cached = MODEL.prefill_time(1000, cached_tokens=1000)
    t1k_after_8k_cached = MODEL.prefill_time(1000, cached_tokens=8000)
    assert t2k > 1.8 * t1k - MODEL.params.step_overhead_s
    assert t1k < t1k_after_1k_cached < 1.1 * t1k  # only attention over the prefix is added
    assert t1k_after_8k_cached < 0.75 * MODEL.prefill_time(9000)
    # Roughly an 8B model on an H100: a 2k-token prefill in tens of milliseconds.
    assert 0.03 < t2k < 0.1


def test_decode_step_grows_with_batch_and_context() -> None:
    times = [MODEL.decode_time(b, b * 1000) for b in (1, 8, 64, 256)]
    assert times == sorted(times) and times[-1] > 2 * times[0]
    assert MODEL.decode_time(8, 8 * 4000) > MODEL.decode_time(8, 8 * 1000)
    assert 0.005 < times[0] < 0.008  # ~5.4 ms weight-read floor + 1 ms overhead


def test_step_time_matches_parts_for_a_scheduled_batch() -> None:
    sched = Scheduler(SchedulerConfig(block_size=16), BlockPool(1024, 16))
    sched.add(Sequence("p", list(range(600)), StopRule(max_tokens=5)))
    out = sched.schedule()
    assert MODEL.step_time(out) == pytest.approx(MODEL.prefill_time(600))
    sched.update({"p": [1]})
    out = sched.schedule()
    assert MODEL.step_time(out) == pytest.approx(MODEL.decode_time(1, 600))
    assert MODEL.step_time(type(out)([], [])) == 0.0


def test_profile_overrides_named_fields(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"step_overhead_s": 0.01, "hbm_bandwidth": 1.5e12}))
    params = load_profile(path)
    assert params.step_overhead_s == 0.01 and params.hbm_bandwidth == 1.5e12
    assert params.weight_bytes == TimingParams().weight_bytes
    assert TimingModel(params).decode_time(1, 0) > MODEL.decode_time(1, 0) + 0.009


def test_bad_profiles_say_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"hbm_bandwith": 1.0}))
    with pytest.raises(ValueError, match="valid keys"):
        load_profile(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read mocker profile"):
        load_profile(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_profile(tmp_path / "missing.json")
    path.write_text(json.dumps({"hbm_bandwidth": -1}))
    with pytest.raises(ValueError, match="non-negative"):
        load_profile(path)
