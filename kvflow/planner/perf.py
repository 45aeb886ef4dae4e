"""A worker's performance model: prefill time by prompt length, decode step time by batch and context.

`kvflow profile` measures the tables on a real worker and writes them as JSON; the
mocker's timing model can fill them analytically (for simulation). Between table
points the model interpolates linearly; beyond the last point it extrapolates from
the last two. `Calibration` refines predictions online: the ratio of what the fleet
reports to what the model predicted, smoothed, scales later predictions.
"""

from __future__ import annotations

import bisect
import json
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


@dataclass
class Calibration:
    """Observed / predicted ratios for TTFT and ITL, smoothed (EWMA); 1.0 until seen."""

    alpha: float = 0.3
    ttft: float = 1.0
    itl: float = 1.0
    history: list[tuple[float, float]] = field(default_factory=list)

    def update(self, predicted_ttft: float, observed_ttft: float | None,
               predicted_itl: float, observed_itl: float | None) -> None:
        if observed_ttft and predicted_ttft > 0:
            self.ttft = self._blend(self.ttft, observed_ttft / predicted_ttft)
        if observed_itl and predicted_itl > 0:
            self.itl = self._blend(self.itl, observed_itl / predicted_itl)
        self.history.append((self.ttft, self.itl))
        del self.history[:-100]

    def _blend(self, old: float, ratio: float) -> float:
        ratio = min(max(ratio, 0.25), 4.0)  # one odd interval never swings the model wildly
        return (1 - self.alpha) * old + self.alpha * ratio
