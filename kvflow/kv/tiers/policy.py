"""When a lower-tier hit is worth loading: measured load time per tier against recompute.

Each tier keeps an exponentially weighted mean of seconds per block loaded (latency
and bandwidth together, as measured by the tier manager); the engine's steps give the
marginal seconds per prefill token (step time against prefill tokens, fixed cost apart).
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
class MarginalRate:
    """Seconds per extra prefill token: the slope of step time against a step's prefill tokens,
    by least squares with exponential forgetting. A step's fixed cost (the weights read once,
    its decode rows, host work) is not what recomputing a block adds, and charging it to the
    tokens made a 16-token step look 40x slower per token than a long prefill: disk hits that
    took twice as long as recomputing were loaded. Until the steps seen differ enough in size
    to fit a slope, or when the fit is not a positive slope below the mean, the weighted mean
    seconds per token serves (an overestimate that includes the fixed cost)."""

    prior: float
    decay: float = 0.95
    samples: int = 0
    _w: float = 0.0
    _n: float = 0.0
    _s: float = 0.0
    _nn: float = 0.0
    _ns: float = 0.0

    def add(self, num_tokens: float, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._n = d * self._n + num_tokens
        self._s = d * self._s + seconds
        self._nn = d * self._nn + num_tokens * num_tokens
        self._ns = d * self._ns + num_tokens * seconds
        self.samples += 1

    @property
    def value(self) -> float:
        if self.samples == 0 or self._n <= 0:
            return self.prior
        mean = self._s / self._n  # seconds per token over all steps, fixed costs included
        var_n = self._nn / self._w - (self._n / self._w) ** 2
        if var_n <= (0.25 * self._n / self._w) ** 2:  # sizes too alike to fit a slope
            return mean
        slope = (self._ns / self._w - self._n * self._s / self._w ** 2) / var_n
        return slope if 0.0 < slope <= mean else mean


@dataclass
class LoadCostModel:
    """Seconds per block for each tier, seconds per token to recompute."""

    block_bytes: int
    block_size: int
    always: bool = False  # --kv-onboard always: every hit is worth loading
    per_block_s: dict[str, Ewma] = field(default_factory=dict)
    recompute_s_per_token: MarginalRate = field(
        default_factory=lambda: MarginalRate(PRIOR_RECOMPUTE_S_PER_TOKEN))

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
