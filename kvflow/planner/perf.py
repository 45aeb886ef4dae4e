"""A worker's performance model: prefill time by prompt length, decode step time by batch and context.

`kvflow profile` measures the tables on a real worker and writes them as JSON; the
mocker's timing model can fill them analytically (for simulation). Between table
points the model interpolates linearly; beyond the last point it extrapolates from
the last two. `Calibration` refines predictions online: the ratios of what the fleet's
requests met to what the model predicted, pooled by load level (requests per second per
worker); their 90th percentile scales later predictions at that load.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

PREFILL_ISL = (16, 128, 512, 1024, 2048, 4096, 8192, 16384)
DECODE_BATCH = (1, 8, 32, 64, 128, 256)
DECODE_CONTEXT = (128, 512, 2048, 8192)


def _interp(xs: tuple[float, ...] | list[float], ys: list[float], x: float) -> float:
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class PerfModel:
    """Measured (or modelled) step times of one worker of one engine configuration."""

    prefill_isl: list[int]
    prefill_s: list[float]  # one uncached prompt of that length, alone
    decode_batch: list[int]
    decode_context: list[int]  # KV tokens per sequence
    decode_s: list[list[float]]  # [batch index][context index]: one decode step
    max_batch: int = 256
    kv_transfer_bytes_per_s: float = 25e9
    kv_bytes_per_token: float = 131072.0
    source: str = "profile"

    def prefill_time(self, isl: float) -> float:
        return _interp(self.prefill_isl, self.prefill_s, isl)

    def decode_step(self, batch: float, context: float) -> float:
        by_batch = [_interp(self.decode_context, row, context) for row in self.decode_s]
        return _interp(self.decode_batch, by_batch, max(batch, 1.0))

    def transfer_time(self, tokens: float) -> float:
        return tokens * self.kv_bytes_per_token / self.kv_transfer_bytes_per_s

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> PerfModel:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"cannot read the performance model {path}: {exc}; "
                             "make one with `kvflow profile`") from exc

    @classmethod
    def from_timing(cls, timing: object, max_batch: int = 256,
                    kv_transfer_bytes_per_s: float = 25e9) -> PerfModel:
        """Fill the tables from a mocker TimingModel (what the mocker would measure)."""
        prefill = [timing.prefill_time(n) for n in PREFILL_ISL]  # type: ignore[attr-defined]
        decode = [[timing.decode_time(b, b * c) for c in DECODE_CONTEXT]  # type: ignore[attr-defined]
                  for b in DECODE_BATCH]
        kv = timing.params.kv_bytes_per_token  # type: ignore[attr-defined]
        return cls(list(PREFILL_ISL), prefill, list(DECODE_BATCH), list(DECODE_CONTEXT), decode,
                   max_batch, kv_transfer_bytes_per_s, kv, source="mocker timing model")


Bins = tuple[tuple[float, float, float], ...]  # (low, high, count): count observations spread
# evenly over [low, high] (low == high: all at that value), as Observation.ttft_bins/itl_bins


def quantile(segments: list[list[float]], q: float) -> float:
    """The q-quantile (0..1) of weighted segments [low, high, weight], each spread evenly over
    [low, high] (a point when low == high): the smallest x with a share q of the weight at or
    below it (for points alone, the nearest-rank percentile)."""
    total = sum(w for _, _, w in segments)
    if total <= 0:
        raise ValueError("no weight")
    jumps: dict[float, float] = {}
    slopes: dict[float, float] = {}
    for lo, hi, w in segments:
        if hi > lo:
            slopes[lo] = slopes.get(lo, 0.0) + w / (hi - lo)
            slopes[hi] = slopes.get(hi, 0.0) - w / (hi - lo)
        else:
            jumps[lo] = jumps.get(lo, 0.0) + w
    want, below, slope = q * total * (1 - 1e-12), 0.0, 0.0
    xs = sorted(set(jumps) | set(slopes))
    for x, nxt in zip(xs, [*xs[1:], xs[-1]], strict=True):
        below += jumps.get(x, 0.0)
        if below >= want:
            return x
        slope += slopes.get(x, 0.0)
        if slope > 0 and below + slope * (nxt - x) >= want:
            return x + (want - below) / slope
        below += slope * (nxt - x)
    return xs[-1]


@dataclass
class _Pool:
    """One level's observed / predicted ratios, each request's as its bucket allows, faded to
    hold `memory` requests; `p90` is kept current."""

    segments: list[list[float]] = field(default_factory=list)
    total: float = 0.0
    p90: float = 1.0

    def add(self, bins: list[tuple[float, float, float]], memory: float) -> None:
        n = sum(c for _, _, c in bins)
        if self.total + n > memory:
            keep = max(memory - n, 0.0) / self.total if self.total else 0.0
            self.segments = [[lo, hi, w * keep] for lo, hi, w in self.segments if w * keep >= 1e-3]
        self.segments.extend([lo, hi, c] for lo, hi, c in bins)
        self.total = sum(w for _, _, w in self.segments)
        self.p90 = quantile(self.segments, 0.9)


@dataclass
class Calibration:
    """Observed / predicted TTFT and ITL p90, by load level: the requests per second one worker gets.

    A model can be wrong by a different factor at each load (a queueing approximation that
    is pessimistic when busy and optimistic when idle), so one factor for all loads cannot
    correct it. Levels are geometric, `step` apart (level k holds rates in [step^k,
    step^(k+1))). Each pools the requests' own latencies, divided by what the model predicted
    for the interval they finished in (a histogram bucket's requests spread over the bucket,
    ratios clamped to 0.25-4 so that one odd interval never swings it wildly), over its last
    `memory` requests (older ones fade); its factor is the 90th percentile of that pool. A p90
    per interval would not do: over 1 s intervals of ~10 requests the sample p90 is biased
    low, and their mean is 0.92-0.96x the pooled p90 (measured on the bench's day). A level is
    used once it holds `min_requests`; between used levels the factor is interpolated in log
    rate; beyond them, the nearest used level's is taken; with none, 1.0.
    """

    step: float = 1.25
    min_requests: float = 20.0
    memory: float = 300.0
    # metric ("ttft" | "itl") -> level -> pooled ratios
    levels: dict[str, dict[int, _Pool]] = field(default_factory=lambda: {"ttft": {}, "itl": {}})

    def level(self, rate_per_worker: float) -> int:
        return math.floor(math.log(max(rate_per_worker, 1e-6)) / math.log(self.step))

    def update(self, ttft_rate: float, itl_rate: float, predicted_ttft: float, ttft: Bins,
               predicted_itl: float, itl: Bins) -> None:
        """Pool one interval's finished requests (their latencies as `Bins`): TTFT at the level of
        `ttft_rate` (the prefill side's rate per worker), ITL at that of `itl_rate` (the decode
        side's), as `factors` reads them; a metric not observed, or not predicted, is left as it was."""
        for name, rate, predicted, bins in (("ttft", ttft_rate, predicted_ttft, ttft),
                                            ("itl", itl_rate, predicted_itl, itl)):
            if not 0 < predicted < math.inf:
                continue
            ratios = [(_clamp(lo / predicted), _clamp(hi / predicted), c) for lo, hi, c in bins if c > 0]
            if ratios:
                self.levels[name].setdefault(self.level(rate), _Pool()).add(ratios, self.memory)

    def factor(self, name: str, rate_per_worker: float) -> float:
        """The correction for metric `name` at this load (see the class docstring)."""
        known = sorted((k, math.log(pool.p90)) for k, pool in self.levels[name].items()
                       if pool.total >= self.min_requests)
        if not known:
            return 1.0
        x = math.log(max(rate_per_worker, 1e-6)) / math.log(self.step) - 0.5  # in level units, centred
        if x <= known[0][0]:
            return math.exp(known[0][1])
        if x >= known[-1][0]:
            return math.exp(known[-1][1])
        i = bisect.bisect_right([k for k, _ in known], x)
        (k0, m0), (k1, m1) = known[i - 1], known[i]
        return math.exp(m0 + (m1 - m0) * (x - k0) / (k1 - k0))

    def factors(self, ttft_rate: float, itl_rate: float) -> tuple[float, float]:
        """(TTFT factor at the prefill side's per-worker rate, ITL factor at the decode side's)."""
        return self.factor("ttft", ttft_rate), self.factor("itl", itl_rate)


def _clamp(ratio: float) -> float:
    return min(max(ratio, 0.25), 4.0)
