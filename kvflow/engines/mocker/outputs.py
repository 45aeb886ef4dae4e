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
from kvflow.llm.protocol import PreprocessedRequest, TopLogprob

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


def mock_logprobs(
    tokens: list[int], first_position: int, seed: int, top_k: int, known: list[int]
) -> tuple[list[float], list[list[TopLogprob]]]:
    """Plausible logprobs for emitted tokens: each token is its position's most likely one
    (a logprob in [-2.5, -0.05]), then `top_k - 1` less likely alternatives taken from
    `known` (the prompt's ids, which the tokenizer surely has), distinct, in falling order."""
    logprobs, tops = [], []
    pool = list(dict.fromkeys(known))
    for i, token in enumerate(tokens):
        h = xxhash.xxh3_64_intdigest((first_position + i).to_bytes(8, "little"), seed=seed & _U64)
        lp = -0.05 - 2.45 * (h % 1000) / 1000
        others = [t for t in pool if t != token]
        start = h % len(others) if others else 0
        picked = (others[start:] + others[:start])[: top_k - 1]
        alternatives = [TopLogprob(token, lp)]
        alternatives += [TopLogprob(t, lp - 0.7 * (j + 1) - (h >> j) % 50 / 100)
                         for j, t in enumerate(picked)]
        logprobs.append(lp)
        tops.append(alternatives)
    return logprobs, tops


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
