"""What the planner observes each interval, and where it reads it: the frontends' /metrics.

The frontends' Prometheus counters are exact (requests, prompt and output tokens,
cached tokens: sums and counts), so rate, mean ISL/OSL and cached fraction over an
interval are the differences between two scrapes. TTFT and ITL p90 come from the
histogram buckets' differences, so they are as fine as the buckets (documented in
docs/planner.md). Several frontends are summed. A scrape that fails leaves the
observation missing: the planner then holds (it never scales down blind).
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from kvflow.planner.model import Load, cv2
from kvflow.planner.perf import Bins

PREFIX = "kvflow_frontend_"
# histogram buckets kept, by family (after PREFIX): the Totals field they go to
_BUCKETS = {"time_to_first_token_seconds_bucket": "ttft_buckets",
            "inter_token_latency_seconds_bucket": "itl_buckets",
            "input_sequence_tokens_bucket": "isl_buckets",
            "uncached_input_tokens_bucket": "uncached_buckets"}
WAITING = "kvflow_router_waiting_requests"  # the frontend's routers' hold, labelled by router


@dataclass(frozen=True)
class Observation:
    """One interval of traffic as the frontends saw it."""

    at_s: float
    interval_s: float
    requests: int
    load: Load
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    # Requests waiting at the routers for a worker under their busy thresholds, at at_s
    # (kvflow_router_waiting_requests; 0 unless a --router-max-* threshold is set).
    held: int = 0
    # The finished requests' TTFT and ITL as histogram bins (low, high, count), which the
    # calibration pools across intervals (a p90 of a few requests is biased low).
    ttft_bins: Bins = ()
    itl_bins: Bins = ()


@dataclass
class Totals:
    """Cumulative counters of one scrape (summed over frontends and labels)."""

    requests: float = 0.0
    isl_sum: float = 0.0
    isl_count: float = 0.0
    osl_sum: float = 0.0
    cached: float = 0.0
    held: float = 0.0  # a gauge: the latest value, summed over routers
    ttft_buckets: dict[float, float] = field(default_factory=dict)
    itl_buckets: dict[float, float] = field(default_factory=dict)
    isl_buckets: dict[float, float] = field(default_factory=dict)
    uncached_buckets: dict[float, float] = field(default_factory=dict)


def parse_metrics(text: str, model: str | None, into: Totals | None = None) -> Totals:
    totals = into or Totals()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if model is not None and s.labels.get("model", model) != model:
                continue
            _add(totals, s.name, s.labels, s.value)
    return totals


def _add(t: Totals, name: str, labels: dict[str, str], value: float) -> None:
    if name == WAITING:
        t.held += value
        return
    if not name.startswith(PREFIX):
        return
    name = name[len(PREFIX):]
    if name == "requests_total":
        t.requests += value
    elif name == "input_sequence_tokens_sum":
        t.isl_sum += value
    elif name == "input_sequence_tokens_count":
        t.isl_count += value
    elif name == "output_sequence_tokens_sum":
        t.osl_sum += value
    elif name == "cached_tokens_total":
        t.cached += value
    elif name in _BUCKETS:
        target = getattr(t, _BUCKETS[name])
        le = float(labels["le"])
        target[le] = target.get(le, 0.0) + value


def _per_bucket(now: dict[float, float], before: dict[float, float]) -> list[tuple[float, float, float]]:
    """(lower edge, upper edge, observations) of every bucket, in order, between two
    cumulative-bucket scrapes (the last bucket's upper edge is +inf)."""
    out, prev_edge, prev_count = [], 0.0, 0.0
    for edge in sorted(now):
        count = now[edge] - before.get(edge, 0.0)
        out.append((prev_edge, edge, count - prev_count))
        prev_edge, prev_count = edge, count
    return out


def _closed(lo: float, hi: float) -> float:
    """A bucket's upper edge, the open last bucket's taken at its lower edge."""
    return lo if hi == float("inf") else hi


def bucket_quantile(now: dict[float, float], before: dict[float, float], q: float) -> float | None:
    """The q-quantile (0..1) of the observations between two cumulative-bucket scrapes."""
    buckets = _per_bucket(now, before)
    total = sum(n for _, _, n in buckets)
    if not buckets or total <= 0:
        return None
    want, below = q * total, 0.0
    for lo, hi, n in buckets:
        if below + n >= want:
            if hi == float("inf"):
                return lo
            return lo + (hi - lo) * (want - below) / max(n, 1e-12)
        below += n
    return buckets[-1][0]


def bucket_bins(now: dict[float, float], before: dict[float, float]) -> Bins:
    """The observations between two cumulative-bucket scrapes as (low, high, count) of each bucket
    that has any; the open last bucket's at its lower edge (as `bucket_quantile` takes it)."""
    return tuple((lo, _closed(lo, hi), n) for lo, hi, n in _per_bucket(now, before) if n > 0)


def bucket_cv2(now: dict[float, float], before: dict[float, float]) -> float:
    """Variance / mean squared of the observations between two cumulative-bucket scrapes, each
    taken as spread evenly over its bucket (the last, open bucket: at its lower edge)."""
    first = second = total = 0.0
    for lo, edge, n in _per_bucket(now, before):
        hi = _closed(lo, edge)
        first += n * (lo + hi) / 2
        second += n * (lo * lo + lo * hi + hi * hi) / 3
        total += n
    return cv2(second / total, first / total) if total > 0 else 0.0


def bucket_shares(now: dict[float, float], before: dict[float, float]) -> tuple[tuple[float, float], ...]:
    """(upper edge, share of the observations) of every bucket, in order, between two
    cumulative-bucket scrapes; () when there were none (what `Load.uncached` holds)."""
    buckets = _per_bucket(now, before)
    total = sum(n for _, _, n in buckets)
    if total <= 0:
        return ()
    return tuple((hi, max(n, 0.0) / total) for _, hi, n in buckets)


def diff(now: Totals, before: Totals, at_s: float, interval_s: float) -> Observation:
    n = max(now.isl_count - before.isl_count, 0.0)
    isl = (now.isl_sum - before.isl_sum) / n if n else 0.0
    osl = (now.osl_sum - before.osl_sum) / n if n else 0.0
    cached = (now.cached - before.cached) / (now.isl_sum - before.isl_sum) if n and isl else 0.0
    load = Load(rate=n / interval_s, isl=isl, osl=osl, cached_fraction=min(max(cached, 0.0), 1.0),
                isl_cv2=bucket_cv2(now.isl_buckets, before.isl_buckets),
                uncached=bucket_shares(now.uncached_buckets, before.uncached_buckets))
    return Observation(at_s, interval_s, int(n), load,
                       bucket_quantile(now.ttft_buckets, before.ttft_buckets, 0.9),
                       bucket_quantile(now.itl_buckets, before.itl_buckets, 0.9),
                       held=int(now.held),
                       ttft_bins=bucket_bins(now.ttft_buckets, before.ttft_buckets),
                       itl_bins=bucket_bins(now.itl_buckets, before.itl_buckets))


class FrontendScraper:
    """Scrapes each frontend's /metrics; `observe()` returns the last interval, or None on failure."""

    def __init__(self, urls: list[str], model: str | None = None, timeout: float = 2.0) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.model = model
        self.timeout = timeout
        self._last: tuple[float, Totals] | None = None
        self.last_error = ""

    def scrape(self) -> Totals:
        totals = Totals()
        for url in self.urls:
            with urllib.request.urlopen(url + "/metrics", timeout=self.timeout) as resp:
                parse_metrics(resp.read().decode(), self.model, totals)
        return totals

    def observe(self, now: float) -> Observation | None:
        try:
            totals = self.scrape()
        except OSError as exc:
            self.last_error = f"cannot scrape frontend metrics: {exc}"
            self._last = None  # the next good scrape starts a fresh interval
            return None
        last, self._last = self._last, (now, totals)
        if last is None or now <= last[0]:
            self.last_error = "first scrape: no interval yet"
            return None
        return diff(totals, last[1], now, now - last[0])
