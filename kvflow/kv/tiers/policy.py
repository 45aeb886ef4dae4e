"""When a lower-tier hit is worth loading: measured load time per tier against recompute.

Each tier keeps an exponentially weighted mean of seconds per block loaded (latency
and bandwidth together, as measured by the tier manager); the engine keeps one of
seconds per prefill token. A run of blocks found in a tier is loaded only when its
predicted load time beats recomputing its tokens. Before the first measurement a tier
uses a conservative prior (below), replaced by what is measured.
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
class LoadCostModel:
    """Seconds per block for each tier, seconds per token to recompute."""

    block_bytes: int
    block_size: int
    always: bool = False  # --kv-onboard always: every hit is worth loading
    per_block_s: dict[str, Ewma] = field(default_factory=dict)
    recompute_s_per_token: Ewma = field(default_factory=lambda: Ewma(PRIOR_RECOMPUTE_S_PER_TOKEN))

    def __post_init__(self) -> None:
        for tier, bw in PRIOR_BANDWIDTH.items():
            self.per_block_s.setdefault(tier, Ewma(PRIOR_LATENCY_S[tier] + self.block_bytes / bw))

    def observe_load(self, tier: str, num_blocks: int, seconds: float) -> None:
        if num_blocks > 0:
            self.per_block_s[tier].add(seconds / num_blocks)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens >= self.block_size:  # tiny steps say more about overhead than compute
            self.recompute_s_per_token.add(seconds / num_tokens)

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
