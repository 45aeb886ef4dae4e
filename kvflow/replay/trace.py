"""Request traces: one JSON line per request (Mooncake's format among those read), and synthetic days.

A line has an arrival time (`timestamp` in ms, or `arrival_s`), a prompt length
(`input_length` / `isl`) and an output length (`output_length` / `osl`); optional
`hash_ids` name the prompt's blocks of `HASH_BLOCK` tokens (equal ids = a shared
prefix), or `token_ids` give the prompt itself. A malformed line is an error that
names its line number.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HASH_BLOCK = 512  # tokens per hash id, as in the public Mooncake traces
VOCAB = 256  # token ids drawn below this (one random byte each), so any test model can embed them


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] | None = None


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


def _field(obj: dict, *names: str) -> object:
    for name in names:
        if name in obj:
            return obj[name]
    raise KeyError(" or ".join(names))


def parse_line(line: str) -> TraceRequest:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    arrival = obj["arrival_s"] if "arrival_s" in obj else float(_field(obj, "timestamp")) / 1000.0
    tokens = obj.get("token_ids")
    isl = len(tokens) if tokens is not None and "input_length" not in obj else int(
        _field(obj, "input_length", "isl"))
    osl = int(_field(obj, "output_length", "osl"))
    if isl < 1 or osl < 1 or float(arrival) < 0:
        raise ValueError(f"input/output lengths must be >= 1 and arrival >= 0: {obj}")
    return TraceRequest(float(arrival), isl, osl, tuple(obj.get("hash_ids") or ()),
                        tuple(tokens) if tokens is not None else None)


def load_trace(path: str | Path, time_scale: float = 1.0) -> list[TraceRequest]:
    """Requests sorted by arrival; `time_scale` 2.0 replays twice as slowly, 0.5 twice as fast."""
    out: list[TraceRequest] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            req = parse_line(line)
        except (ValueError, KeyError, TypeError) as exc:
            raise TraceError(f"{path}:{number}: bad trace line ({exc}); expected JSON with "
                             "timestamp|arrival_s, input_length|isl, output_length|osl") from exc
        out.append(TraceRequest(req.arrival_s * time_scale, req.input_length, req.output_length,
                                req.hash_ids, req.token_ids))
    out.sort(key=lambda r: r.arrival_s)
    if out:
        start = out[0].arrival_s
        out = [TraceRequest(r.arrival_s - start, r.input_length, r.output_length, r.hash_ids,
                            r.token_ids) for r in out]
    return out


def write_trace(path: str | Path, requests: list[TraceRequest]) -> None:
    with open(path, "w") as f:
        for r in requests:
            obj: dict[str, object] = {"timestamp": round(r.arrival_s * 1000, 3),
                                      "input_length": r.input_length, "output_length": r.output_length}
            if r.hash_ids:
                obj["hash_ids"] = list(r.hash_ids)
            f.write(json.dumps(obj) + "\n")


def _burst_starts(rng: random.Random, day_s: float, bursts: int) -> list[float]:
    """Burst onsets, drawn first from the day's generator: anywhere in the middle 80% of the day."""
    return sorted(rng.uniform(0.1, 0.9) * day_s for _ in range(bursts))


# The synthetic day's bursts by default: how many, how long, and their rate over the rate around them.
BURSTS = 4
BURST_S = 60.0
BURST_RATIO = 2.5


def synthetic_bursts(*, seed: int = 0, day_s: float = 3600.0, bursts: int = BURSTS,
                     burst_s: float = BURST_S) -> list[tuple[float, float]]:
    """The (start, end) of each burst of `synthetic_day` with the same arguments."""
    return [(b, b + burst_s) for b in _burst_starts(random.Random(seed), day_s, bursts)]


def without_bursts(trace: list[TraceRequest], bursts: list[tuple[float, float]], burst_ratio: float,
                   seed: int = 0) -> list[TraceRequest]:
    """The trace's steady part: inside each burst, each request is kept with probability
    1 / burst_ratio (a Poisson process thinned back to the rate around it)."""
    rng = random.Random(seed)
    return [r for r in trace
            if not any(b <= r.arrival_s < e for b, e in bursts) or rng.random() * burst_ratio < 1.0]


@lru_cache(maxsize=4096)
def _block_tokens(hash_id: int) -> tuple[int, ...]:
    return tuple(random.Random(hash_id * 7919 + 17).randbytes(HASH_BLOCK))


def prompt_tokens(req: TraceRequest, salt: int) -> list[int]:
    """The request's prompt: its token ids, or its hash blocks' tokens, padded uniquely."""
    if req.token_ids is not None:
        return list(req.token_ids)
    tokens: list[int] = []
    for h in req.hash_ids:
        if len(tokens) >= req.input_length:
            break
        tokens.extend(_block_tokens(h))
    tokens.extend(random.Random(salt).randbytes(max(0, req.input_length - len(tokens))))
    return tokens[: req.input_length]


def synthetic_day(*, seed: int = 0, day_s: float = 3600.0, mean_rate: float = 4.0,
                  peak_ratio: float = 3.0, bursts: int = BURSTS, burst_s: float = BURST_S,
                  burst_ratio: float = BURST_RATIO, isl: tuple[int, int] = (200, 3000),
                  osl: tuple[int, int] = (50, 300), shared_prefixes: int = 20) -> list[TraceRequest]:
    """A compressed day: diurnal rate (trough at start, peak mid-day), short bursts, mixed ISL/OSL."""
    rng = random.Random(seed)
    burst_at = _burst_starts(rng, day_s, bursts)
    lo = 2 * mean_rate / (1 + peak_ratio)

    def rate(t: float) -> float:
        base = lo + (peak_ratio * lo - lo) * (1 - math.cos(2 * math.pi * t / day_s)) / 2
        return base * (burst_ratio if any(b <= t < b + burst_s for b in burst_at) else 1.0)

    peak = max(rate(t) for t in [x * day_s / 500 for x in range(500)] + burst_at)
    out: list[TraceRequest] = []
    t = 0.0
    while True:  # thinning: a Poisson process with rate(t)
        t += rng.expovariate(peak)
        if t >= day_s:
            return out
        if rng.random() * peak > rate(t):
            continue
        n_in = int(math.exp(rng.uniform(math.log(isl[0]), math.log(isl[1]))))
        n_out = int(math.exp(rng.uniform(math.log(osl[0]), math.log(osl[1]))))
        group = rng.randrange(shared_prefixes)
        shared = [10_000 + group * 8 + k for k in range(rng.randrange(0, 3))]
        own = [rng.randrange(1 << 30) for _ in range(n_in // HASH_BLOCK + 1)]
        out.append(TraceRequest(t, n_in, n_out, tuple(shared + own)))
