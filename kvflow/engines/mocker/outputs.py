"""Which tokens the mocker emits, registered by name: "random" (seeded) and "echo".

A token depends only on the sequence's seed and its output position, so a request
preempted and recomputed, or replayed with the same seed, yields the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import xxhash

from kvflow.engines.core.sequence import Sequence
from kvflow.llm.kv_hash import HASH_SEED, local_block_hash
from kvflow.llm.protocol import PreprocessedRequest

_U64 = (1 << 64) - 1


class OutputMode(Protocol):
    def next_token(self, seq: Sequence) -> int:
        """The token `seq` emits at output position `seq.num_output_tokens`."""
        ...


class RandomOutput:
    """Uniform tokens in [0, vocab_size), never an EOS id: max_tokens decides the length."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def next_token(self, seq: Sequence) -> int:
        position = seq.num_output_tokens.to_bytes(8, "little")
        token = xxhash.xxh3_64_intdigest(position, seed=seq.seed) % self.vocab_size
        eos = seq.stop.eos_token_ids
        while eos and token in eos:
            token = (token + 1) % self.vocab_size
        return token


class EchoOutput:
    """The prompt again, cyclically."""

    def next_token(self, seq: Sequence) -> int:
        return seq.token_ids[seq.num_output_tokens % seq.prompt_len]


_OUTPUTS: dict[str, Callable[[int], OutputMode]] = {
    "random": RandomOutput,
    "echo": lambda vocab_size: EchoOutput(),
}


def output_names() -> list[str]:
    return sorted(_OUTPUTS)


def make_output(name: str, vocab_size: int) -> OutputMode:
    return _OUTPUTS[name](vocab_size)


def sequence_seed(request: PreprocessedRequest, engine_seed: int) -> int:
    """A request's token seed: from its prompt when greedy or seeded, else from its id.

    A migrated request's prompt ends with the tokens it generated before
    (`prior_output_tokens`); only the original prompt counts, so it keeps its seed.
    """
    sampling = request.sampling
    seed = (engine_seed ^ HASH_SEED) & _U64
    if sampling.temperature == 0 or sampling.seed is not None:
        prompt = request.token_ids[: len(request.token_ids) - request.prior_output_tokens]
        key = (local_block_hash(prompt) ^ (sampling.seed or 0)) & _U64
        return xxhash.xxh3_64_intdigest(key.to_bytes(8, "little"), seed=seed)
    return xxhash.xxh3_64_intdigest(request.request_id.encode(), seed=seed)
