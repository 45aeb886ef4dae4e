"""One request as the scheduler sees it: tokens, computed-token count, KV blocks, stop rule.

Everything the scheduler does is expressed on two numbers: `num_tokens` (prompt plus
tokens generated so far) and `num_computed_tokens` (positions whose KV exists). A
prefill, a prefill chunk, a prefix-cache hit and a remote prefill all just advance
`num_computed_tokens`; a sampled token grows `num_tokens` by one.

With async output (scheduler.py) a token can be counted before its value is known: it is
a placeholder, counted in `num_tokens` but not yet in `token_ids`, until the step that
samples it reports back. `token_ids` only ever holds real tokens.

Ownership: the scheduler owns `block_ids` and `num_computed_tokens`; engines read
them (e.g. to build a block table) but never change them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvflow.llm.kv_hash import chain_hash, extra_seed, local_block_hash
from kvflow.llm.protocol import (
    FINISH_LENGTH,
    FINISH_STOP,
    DisaggHint,
    KvTransferStats,
    PreprocessedRequest,
    SamplingOptions,
)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    LOADING = "loading"  # waiting for a connector to fill its blocks (kvflow.kv.connector)
    FINISHED = "finished"


@dataclass(frozen=True)
class StopRule:
    """When a sequence ends, resolved from the request's StopConditions and EOS ids."""

    max_tokens: int | None = None
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False

    def finish_reason(self, token: int, num_output_tokens: int) -> str | None:
        """Why the sequence ends after emitting `token` as output number `num_output_tokens`."""
        if num_output_tokens >= self.min_tokens and (
            token in self.stop_token_ids or (token in self.eos_token_ids and not self.ignore_eos)
        ):
            return FINISH_STOP
        if self.max_tokens is not None and num_output_tokens >= self.max_tokens:
            return FINISH_LENGTH
        return None


@dataclass(eq=False, slots=True)
class Sequence:
    """A request inside an engine. Identity matters: compare with `is`, not `==`."""

    request_id: str
    token_ids: list[int]
    stop: StopRule = field(default_factory=StopRule)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    lora_name: str | None = None
    cache_salt: str | None = None
    seed: int = 0  # per-request sampling seed, chosen by the engine
    prompt_len: int = -1
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served from caches at first admission
    cached_by_tier: dict[str, int] | None = None  # of those, per KV tier (device, host, ...)
    block_ids: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0
    num_preemptions: int = 0
    num_placeholders: int = 0  # sampled tokens scheduled on but not yet known (async output)
    disagg: DisaggHint | None = None  # which half of a disaggregated request (connectors read it)
    kv_transfer: KvTransferStats | None = None  # KV a connector loaded for it (reported once)
    _hashes: list[int] = field(default_factory=list)
    _hash_seed: int | None = None

    def __post_init__(self) -> None:
        if self.prompt_len < 0:
            self.prompt_len = len(self.token_ids)
        self._hash_seed = extra_seed(self.lora_name, salt=self.cache_salt)

    @classmethod
    def from_request(cls, request: PreprocessedRequest, *, seed: int = 0) -> Sequence:
        stop = request.stop
        rule = StopRule(
            max_tokens=stop.max_tokens,
            min_tokens=stop.min_tokens or 0,
            stop_token_ids=frozenset(stop.stop_token_ids),
            eos_token_ids=frozenset(request.eos_token_ids),
            ignore_eos=stop.ignore_eos,
        )
        routing = request.routing
        return cls(
            request.request_id,
            list(request.token_ids),
            rule,
            request.sampling,
            lora_name=routing.lora_name if routing is not None else None,
            cache_salt=request.cache_salt,
            seed=seed,
            disagg=routing.disagg if routing is not None else None,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    def isolate_cache(self, salt: str) -> None:
        """Give this sequence block hashes of its own: it neither reuses cached blocks nor
        leaves blocks others would match (e.g. when every prompt token must be computed)."""
        self._hash_seed = extra_seed(salt)
        self._hashes.clear()

    @property
    def parent_hash_seed(self) -> int | None:
        """The chain seed of block 0 (separates LoRA adapters); None when there is none."""
        return self._hash_seed

    def block_hashes(self, n: int, block_size: int) -> list[int]:
        """Sequence hashes of the first `n` full blocks (a copy)."""
        self._extend_hashes(n, block_size)
        return self._hashes[:n]

    def block_hash(self, i: int, block_size: int) -> int:
        """Sequence hash of full block `i`."""
        self._extend_hashes(i + 1, block_size)
        return self._hashes[i]

    def _extend_hashes(self, n: int, block_size: int) -> None:
        hashes = self._hashes
        if n <= len(hashes):
            return
        assert n * block_size <= len(self.token_ids), "hash of a block that is not full"
        parent = hashes[-1] if hashes else self._hash_seed
        for i in range(len(hashes), n):
            local = local_block_hash(self.token_ids[i * block_size : (i + 1) * block_size])
            parent = chain_hash(parent, local)
            hashes.append(parent)

    def reset_for_recompute(self) -> None:
        """Forget all KV (after preemption); the caller has already freed `block_ids`."""
        self.block_ids = []
        self.num_computed_tokens = 0
        self.num_committed_blocks = 0
        self.num_preemptions += 1
        self.status = SeqStatus.WAITING
