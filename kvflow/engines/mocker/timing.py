"""How long one simulated engine step takes: a roofline over the step's batch.

A step moves bytes (weights once, plus the KV cache it reads and writes) and does
flops (linear layers per new token, attention per query-key pair). Its time is a
fixed overhead plus the larger of memory time and compute time, plus the time to
move externally supplied KV (host tier, remote prefill).

Defaults approximate Llama-3-8B in BF16 on one H100 SXM:
- weights: 8.03e9 params x 2 B = 16.06 GB read once per step. HBM3 peaks at
  3.35 TB/s; ~3.0 TB/s is reachable, so a decode step has a ~5.4 ms floor.
- KV per token: 32 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 B = 128 KiB.
  A decode step reads every running sequence's context: 64 seqs x 2k tokens
  = 16.8 GB, which more than doubles the step.
- linear flops: 2 x 8.03e9 per token; BF16 dense peak is 989 TFLOP/s, large
  prefills reach ~60%, so 6e14 -> 27 us/token: a 2k-token prompt ~ 55 ms.
- attention flops: 4 x 4096 (hidden) x 32 (layers) = 524k per query-key pair
  (QK^T and PV, multiply-add); flash attention reaches ~4e14 on long prompts.
- overhead: ~1 ms per step for scheduling, launches and sampling on the host.

Decode is memory-bound (grows with batch size through KV reads, and with batch x
flops beyond ~200 seqs); prefill is compute-bound (grows with uncached tokens; a
cached prefix only adds its attention pairs). A JSON profile overrides any of the
`TimingParams` fields by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from kvflow.engines.core.scheduler import SchedulerOutput


@dataclass(frozen=True)
class TimingParams:
    weight_bytes: float = 16.06e9
    kv_bytes_per_token: float = 131072.0
    flops_per_token: float = 16.06e9
    attn_flops_per_pair: float = 524288.0
    hbm_bandwidth: float = 3.0e12  # bytes/s, effective
    matmul_flops: float = 6.0e14  # flop/s, effective
    attn_flops: float = 4.0e14  # flop/s, effective
    step_overhead_s: float = 1.0e-3


def load_profile(path: str | Path, base: TimingParams | None = None) -> TimingParams:
    """`base` (default TimingParams()) with the fields named in the JSON object at `path`."""
    base = base or TimingParams()
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read mocker profile {path}: {exc}; pass a JSON object") from exc
    known = {f.name for f in fields(TimingParams)}
    if not isinstance(data, dict) or not set(data) <= known:
        unknown = sorted(set(data) - known) if isinstance(data, dict) else data
        raise ValueError(
            f"mocker profile {path} has unknown keys {unknown}; valid keys: {sorted(known)}"
        )
    if not all(isinstance(v, int | float) and v >= 0 for v in data.values()):
        raise ValueError(f"mocker profile {path}: every value must be a non-negative number")
    return replace(base, **{k: float(v) for k, v in data.items()})


class TimingModel:
    """Seconds per step for a batch, from TimingParams."""

    def __init__(self, params: TimingParams | None = None) -> None:
        self.params = params or TimingParams()

    def step_time(self, out: SchedulerOutput) -> float:
        """Modelled duration of the step `out` describes (0 for an empty step)."""
        if not out.scheduled:
            return 0.0
        new_tokens = pairs = kv_tokens = 0
        transfer_s = 0.0
        for s in out.scheduled:
            n = s.num_new_tokens
            new_tokens += n
            pairs += n * s.start + n * (n + 1) // 2
            kv_tokens += s.start + n
            transfer_s += s.external.transfer_s
        return self._roofline(new_tokens, pairs, kv_tokens) + transfer_s

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """One step prefilling `new_tokens` after `cached_tokens` of cached context."""
        pairs = new_tokens * cached_tokens + new_tokens * (new_tokens + 1) // 2
        return self._roofline(new_tokens, pairs, cached_tokens + new_tokens)

    def decode_time(self, batch_size: int, context_tokens: int) -> float:
        """One decode step of `batch_size` sequences with `context_tokens` of KV in all."""
        attended = context_tokens + batch_size  # each new token also attends to itself
        return self._roofline(batch_size, attended, attended)

    def _roofline(self, new_tokens: int, pairs: int, kv_tokens: int) -> float:
        p = self.params
        memory_s = (p.weight_bytes + kv_tokens * p.kv_bytes_per_token) / p.hbm_bandwidth
        compute_s = new_tokens * p.flops_per_token / p.matmul_flops
        compute_s += pairs * p.attn_flops_per_pair / p.attn_flops
        return p.step_overhead_s + max(memory_s, compute_s)
