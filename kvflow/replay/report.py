"""Per-request results of a replay, and their summary per window: TTFT/ITL p90 and SLA attainment."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestResult:
    arrival_s: float
    ttft_s: float  # inf when the request failed before its first token
    itl_s: float  # mean inter-token latency of the request (0 with one token)
    output_tokens: int
    error: str = ""


@dataclass(frozen=True)
class WindowStats:
    start_s: float
    requests: int
    errors: int
    ttft_p50_s: float
    ttft_p90_s: float
    itl_p50_s: float
    itl_p90_s: float
    meets_sla: bool


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def meets_sla(group: list[RequestResult], ttft_sla: float, itl_sla: float) -> bool:
    """A group of requests meets the SLA when its TTFT and ITL p90s do and none failed."""
    itl = [r.itl_s for r in group if r.output_tokens > 1]
    return (not any(r.error for r in group) and percentile([r.ttft_s for r in group], 90) <= ttft_sla
            and percentile(itl, 90) <= itl_sla)


def windows(results: list[RequestResult], window_s: float, ttft_sla: float,
            itl_sla: float) -> list[WindowStats]:
    """Requests grouped by arrival window; a window meets the SLA when its p90s do and none failed."""
    if not results:
        return []
    last = max(r.arrival_s for r in results)
    buckets: list[list[RequestResult]] = [[] for _ in range(int(last // window_s) + 1)]
    for r in results:
        buckets[int(r.arrival_s // window_s)].append(r)
    out = []
    for i, group in enumerate(buckets):
        ttft = [r.ttft_s for r in group]
        itl = [r.itl_s for r in group if r.output_tokens > 1]
        errors = sum(1 for r in group if r.error)
        out.append(WindowStats(i * window_s, len(group), errors, percentile(ttft, 50),
                               percentile(ttft, 90), percentile(itl, 50), percentile(itl, 90),
                               meets_sla(group, ttft_sla, itl_sla)))
    return out


def attainment(stats: list[WindowStats]) -> float:
    """Share of windows (with traffic) that met the SLA."""
    busy = [w for w in stats if w.requests]
    return sum(w.meets_sla for w in busy) / len(busy) if busy else 1.0


def format_windows(stats: list[WindowStats]) -> str:
    lines = ["window_start_s requests errors ttft_p50_ms ttft_p90_ms itl_p50_ms itl_p90_ms sla"]
    for w in stats:
        lines.append(f"{w.start_s:14.0f} {w.requests:8d} {w.errors:6d} {w.ttft_p50_s * 1e3:11.1f} "
                     f"{w.ttft_p90_s * 1e3:11.1f} {w.itl_p50_s * 1e3:10.2f} {w.itl_p90_s * 1e3:10.2f} "
                     f"{'ok' if w.meets_sla else 'MISS'}")
    return "\n".join(lines)
