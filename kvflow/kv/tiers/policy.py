"""When a lower-tier hit is worth loading: measured load time per tier against recompute.

Each tier keeps an exponentially weighted mean of seconds per block loaded (latency
and bandwidth together, as measured by the tier manager); the engine's long prefill
steps give the seconds per prompt token of recomputing.
A run of blocks found in a tier is loaded only when its predicted load time beats
recomputing its tokens. Before the first measurement a tier uses a conservative prior
(below), replaced by what is measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Priors, seconds per byte, used until a tier's first measured load.
PRIOR_BANDWIDTH = {"host": 5e9, "disk": 1e9, "object": 2e8}
PRIOR_LATENCY_S = {"host": 1e-5, "disk": 2e-4, "object": 5e-3}
PRIOR_RECOMPUTE_S_PER_TOKEN = 1e-3


@dataclass
class Ewma:
    """An exponentially weighted mean; `value` is the prior until the first sample."""

    value: float
    alpha: float = 0.2
    samples: int = 0

    def add(self, x: float) -> None:
        self.value = x if self.samples == 0 else self.value + self.alpha * (x - self.value)
        self.samples += 1


@dataclass
class PrefillRate:
    """Seconds per prompt token of recomputing, measured on the largest prefill steps seen.

    A step's time is a fixed part (the weights read once, its decode rows, host work, and
    any wait for blocks being loaded) plus a part per prompt token; only the second is what
    recomputing a block costs. Charged to a 16-token step's tokens, the fixed part made a
    token look 40x dearer than in a long prefill, and disk hits that took twice as long as
    recomputing were loaded. So only steps with at least a quarter of the most prompt tokens
    seen in one step count (their fixed part is spread thin), and when a step raises that
    mark fourfold the smaller steps' mean is dropped. A least-squares slope over all steps
    was tried first: steps that waited for a disk load (few tokens, long time) pulled it
    towards zero, which would have declined every host hit."""

    prior: float
    alpha: float = 0.2
    largest: int = 0
    mean: Ewma = field(init=False)

    def __post_init__(self) -> None:
        self.mean = Ewma(self.prior, self.alpha)

    def add(self, num_tokens: int, seconds: float) -> None:
        if num_tokens >= 4 * self.largest:
            self.mean = Ewma(self.prior, self.alpha)  # the steps so far are small next to this one
        self.largest = max(self.largest, num_tokens)
        if 4 * num_tokens >= self.largest:
            self.mean.add(seconds / num_tokens)

    @property
    def value(self) -> float:
        return self.mean.value


@dataclass
class LoadCostModel:
    """Seconds per block for each tier, seconds per token to recompute."""

    block_bytes: int
    block_size: int
    always: bool = False  # --kv-onboard always: every hit is worth loading
    per_block_s: dict[str, Ewma] = field(default_factory=dict)
    recompute_s_per_token: PrefillRate = field(
        default_factory=lambda: PrefillRate(PRIOR_RECOMPUTE_S_PER_TOKEN))

    def __post_init__(self) -> None:
        for tier, bw in PRIOR_BANDWIDTH.items():
            self.per_block_s.setdefault(tier, Ewma(PRIOR_LATENCY_S[tier] + self.block_bytes / bw))

    def observe_load(self, tier: str, num_blocks: int, seconds: float) -> None:
        if num_blocks > 0:
            self.per_block_s[tier].add(seconds / num_blocks)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0:
            self.recompute_s_per_token.add(num_tokens, seconds)

    def load_s(self, tier: str, num_blocks: int) -> float:
        return self.per_block_s[tier].value * num_blocks

    def recompute_s(self, num_blocks: int) -> float:
        return self.recompute_s_per_token.value * num_blocks * self.block_size

    def worth_loading(self, tier: str, num_blocks: int) -> bool:
        """Load `num_blocks` from `tier` only if that is predicted faster than recomputing."""
        return self.always or self.load_s(tier, num_blocks) < self.recompute_s(num_blocks)

    def snapshot(self) -> dict[str, float]:
        """Seconds per block by tier and to recompute one block (published to routers)."""
        out = {tier: e.value for tier, e in self.per_block_s.items()}
        out["recompute"] = self.recompute_s(1)
        return out
