"""The conditional disaggregation rule: where a request is prefilled, and why."""

from __future__ import annotations

import pytest

from kvflow.frontend.disagg import DisaggConfig, plan_prefill

C = DisaggConfig(min_remote_prefill_tokens=512, max_prefill_queue_tokens=4096)


@pytest.mark.parametrize(("tokens", "cached", "queue", "remote", "reason"), [
    (3000, 0, 0, True, "long_prompt"),
    (200, 0, 0, False, "short_or_cached"),
    (3000, 2800, 0, False, "short_or_cached"),  # the decode worker already holds the prefix
    (3000, 0, 5000, False, "prefill_busy"),
    (3000, 0, None, False, "no_prefill_workers"),
])
def test_conditional_rule(tokens: int, cached: int, queue: int | None, remote: bool,
                          reason: str) -> None:
    plan = plan_prefill(tokens, cached, queue, C)
    assert (plan.remote, plan.reason) == (remote, reason)
    assert plan.uncached_tokens == tokens - cached


def test_forced_modes_and_bad_mode() -> None:
    assert plan_prefill(10, 0, 99999, DisaggConfig(mode="always")).remote
    assert not plan_prefill(9999, 0, 0, DisaggConfig(mode="never")).remote
    with pytest.raises(ValueError, match="conditional, always, never"):
        DisaggConfig(mode="sometimes")
