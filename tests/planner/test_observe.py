"""Observation from the frontends' /metrics: exact counter differences, p90 from histogram buckets."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kvflow.frontend.metrics import FrontendMetrics
from kvflow.planner.observe import (
    bucket_bins,
    bucket_cv2,
    bucket_quantile,
    bucket_shares,
    diff,
    parse_metrics,
)
from kvflow.router import KvRouter, KvRouterConfig


def _record(metrics: FrontendMetrics, ttft: float, isl: int, osl: int, cached: int) -> None:
    metrics.ttft.labels(model="m").observe(ttft)
    metrics.itl.labels(model="m").observe(0.02)
    metrics.isl.labels(model="m").observe(isl)
    metrics.osl.labels(model="m").observe(osl)
    metrics.cached.labels(model="m").inc(cached)
    metrics.requests.labels(model="m", endpoint="chat", status="success").inc()


def test_interval_from_two_scrapes_of_a_real_frontend_registry() -> None:
    metrics = FrontendMetrics()
    _record(metrics, 0.05, 100, 10, 0)
    before = parse_metrics(metrics.render().decode(), "m")
    for i in range(20):
        _record(metrics, 0.2 if i < 18 else 3.0, 1000, 50, 500)
    _record_other = metrics.isl.labels(model="other")
    _record_other.observe(99999)  # another model's traffic is not counted
    now = parse_metrics(metrics.render().decode(), "m")
    obs = diff(now, before, at_s=20.0, interval_s=10.0)
    assert obs.requests == 20
    assert obs.load.rate == pytest.approx(2.0)
    assert (obs.load.isl, obs.load.osl) == (1000, 50)
    assert obs.load.cached_fraction == pytest.approx(0.5)
    assert 0.1 <= obs.ttft_p90_s <= 0.25  # 18 of 20 at 0.2 s: p90 within the 0.1-0.25 bucket
    assert obs.itl_p90_s == pytest.approx(0.02, abs=0.01)
    # The requests themselves, by bucket, for the calibration to pool: 18 TTFTs in (0.1, 0.25],
    # 2 in (2.5, 5]; 20 ITLs in (0.01, 0.02] (0.02 is the bucket's upper edge).
    assert obs.ttft_bins == ((0.1, 0.25, 18.0), (2.5, 5.0, 2.0))
    assert obs.itl_bins == ((0.01, 0.02, 20.0),)


def test_prompt_length_spread_from_the_histogram_buckets() -> None:
    # Between the scrapes: one prompt in (2, 4], one in (4, 8], each taken as even over its
    # bucket: mean (3 + 6) / 2 = 4.5, mean square (28/3 + 112/3) / 2 = 70/3, so
    # cv^2 = (70/3) / 4.5^2 - 1 = 0.15226 (the exact 3 and 6 would give 0.1111).
    before = {2.0: 5.0, 4.0: 5.0, 8.0: 5.0, float("inf"): 5.0}
    now = {2.0: 5.0, 4.0: 6.0, 8.0: 7.0, float("inf"): 7.0}
    assert bucket_cv2(now, before) == pytest.approx(70 / 3 / 4.5**2 - 1)
    # One in (0, 2] (mean 1, mean square 4/3) and one in the open bucket, taken at its lower
    # edge 8: mean 4.5, mean square (4/3 + 64) / 2, cv^2 = 0.61317.
    now = {2.0: 6.0, 4.0: 6.0, 8.0: 6.0, float("inf"): 7.0}
    assert bucket_cv2(now, before) == pytest.approx((4 / 3 + 64) / 2 / 4.5**2 - 1)
    assert bucket_cv2(before, before) == 0.0


def test_a_real_frontend_s_prompt_spread_reaches_the_observation() -> None:
    metrics = FrontendMetrics()
    before = parse_metrics(metrics.render().decode(), "m")
    _record(metrics, 0.1, 3, 10, 0)
    _record(metrics, 0.1, 6, 10, 0)
    obs = diff(parse_metrics(metrics.render().decode(), "m"), before, at_s=1.0, interval_s=1.0)
    assert obs.load.isl == 4.5 and obs.load.isl_cv2 == pytest.approx(70 / 3 / 4.5**2 - 1)


def test_uncached_prompt_tokens_by_bucket_from_a_real_frontend_request() -> None:
    # A request's prefill computes its prompt less the cached tokens: 1000 - 500 = 500 in
    # (256, 512], 1000 - 0 in (512, 1024], 100 - 100 = 0 in (0, 1]; shares 1/3 each, every
    # bucket listed (the empty ones at 0) up to the open one.
    metrics = FrontendMetrics()
    before = parse_metrics(metrics.render().decode(), "m")
    for prompt, cached in ((1000, 500), (1000, 0), (100, 100)):
        record = metrics.request("m", "chat")
        record.prompt_tokens, record.completion_tokens, record.cached_tokens = prompt, 10, cached
        record.finish("success")
    failed = metrics.request("m", "chat")
    failed.prompt_tokens = 4000
    failed.finish("error")  # only successes are counted, as the other token histograms
    shares = diff(parse_metrics(metrics.render().decode(), "m"), before, 1.0, 1.0).load.uncached
    assert [e for e, _ in shares] == [float(2**i) for i in range(18)] + [float("inf")]
    assert {e: s for e, s in shares if s} == {1.0: pytest.approx(1 / 3), 512.0: pytest.approx(1 / 3),
                                             1024.0: pytest.approx(1 / 3)}
    assert bucket_shares({1.0: 2.0, float("inf"): 2.0}, {1.0: 2.0, float("inf"): 2.0}) == ()


def test_bucket_quantile_interpolates_and_handles_no_traffic() -> None:
    before = {0.1: 0.0, 1.0: 0.0, float("inf"): 0.0}
    now = {0.1: 50.0, 1.0: 100.0, float("inf"): 100.0}
    assert bucket_bins(now, before) == ((0.0, 0.1, 50.0), (0.1, 1.0, 50.0))
    # The open bucket's requests are taken at its lower edge, as bucket_quantile takes them.
    assert bucket_bins({**now, float("inf"): 103.0}, before)[-1] == (1.0, 1.0, 3.0)
    assert bucket_bins(before, before) == ()
    assert bucket_quantile(now, before, 0.5) == pytest.approx(0.1)
    assert bucket_quantile(now, before, 0.75) == pytest.approx(0.55)
    assert bucket_quantile(before, before, 0.9) is None



async def test_requests_held_at_the_routers_are_read_from_their_gauge() -> None:
    registry = CollectorRegistry()
    waiting = []
    for name, held in (("a", 3), ("b", 4)):  # two routers, one worker each, one request a worker
        router = KvRouter(KvRouterConfig(use_kv_events=False, max_active_requests=1), None,
                          registry=registry, name=name)
        router.on_worker_added(1)
        await router.schedule([1, 2, 3], f"{name}-running")
        waiting += [asyncio.create_task(router.schedule([1, 2, 3], f"{name}{i}")) for i in range(held)]
    await asyncio.sleep(0.01)
    now = parse_metrics(generate_latest(registry).decode(), "m")
    assert diff(now, parse_metrics("", "m"), at_s=10.0, interval_s=5.0).held == 7  # a gauge: summed
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
