"""Batched sampling on the device: penalties, grammars, min_tokens, greedy, temperature, top-k/p, min-p.

Per-request seeds are honoured with one `torch.Generator` per seeded request: a row's noise
comes only from its own generator, so a seeded request samples the same tokens whatever
else shares its batch. Only the sampled ids (and logprobs when asked) go back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvflow.llm.protocol import EmbedOptions, SamplingOptions, StopConditions

if TYPE_CHECKING:
    from kvflow.engines.native.guided import Guide, GuidedDecoding

_EPS = 1e-10


@dataclass
class RequestSampling:
    """One request's sampling parameters, resolved once when the request arrives."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    # EOS and stop ids, masked while fewer than min_tokens were generated.
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    generator: torch.Generator | None = None
    # Guided decoding (response_format): the request's grammar state.
    guide: Guide | None = None
    # An embedding request: pool its prompt's hidden states (its sampled token is dropped).
    embed: EmbedOptions | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS or self.top_k == 1

    @property
    def plain(self) -> bool:
        """No penalties, no grammar, no min_tokens, no logprobs: nothing beyond the choice."""
        return (not self.penalized and self.guide is None and self.min_tokens == 0
                and self.logprobs is None)

    @property
    def reads_tokens(self) -> bool:
        """Whether sampling needs the request's real previous tokens (no step ahead)."""
        return self.penalized or self.guide is not None

    @property
    def penalized(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @classmethod
    def from_request(
        cls,
        sampling: SamplingOptions,
        stop: StopConditions,
        eos_ids: list[int],
        device: torch.device,
    ) -> RequestSampling:
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        return cls(
            temperature=1.0 if sampling.temperature is None else sampling.temperature,
            top_p=1.0 if sampling.top_p is None else sampling.top_p,
            top_k=sampling.top_k or 0,
            min_p=sampling.min_p or 0.0,
            presence_penalty=sampling.presence_penalty or 0.0,
            frequency_penalty=sampling.frequency_penalty or 0.0,
            repetition_penalty=sampling.repetition_penalty or 1.0,
            min_tokens=stop.min_tokens or 0,
            stop_ids=tuple(eos_ids) + tuple(stop.stop_token_ids),
            logprobs=sampling.logprobs,
            generator=generator,
        )


@dataclass
class SampleRow:
    """One row of a step's logits: whose it is and what it generated so far."""

    params: RequestSampling
    prompt_ids: list[int]  # filled only when the request has penalties
    output_ids: list[int]
    num_output: int = -1  # tokens generated so far; -1 = len(output_ids)

    def __post_init__(self) -> None:
        if self.num_output < 0:
            self.num_output = len(self.output_ids)


@dataclass
class SamplerOutput:
    """Host-side results of one step, one entry per row."""

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    rows_with_logprobs: list[bool] = field(default_factory=list)


class Sampler:
    """Turns a step's logits [B, V] (float32) into one token per row."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # Set by the engine once a request asks for guided decoding.
        self.guided: GuidedDecoding | None = None

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        return self.collect(logits, self.sample_ids(logits, rows), rows)

    def sample_ids(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """One token id per row, int64 on the device."""
        params = [r.params for r in rows]
        if all(p.greedy and p.plain for p in params):  # the common decode case: one argmax
            return logits.argmax(dim=-1)
        logits = self._penalize(logits, rows)
        logits = self._apply_grammars(logits, rows)
        logits = self._mask_min_tokens(logits, rows)
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        return self._sample(logits, params)

    def _penalize(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        idx = [i for i, r in enumerate(rows) if r.params.penalized]
        if not idx:
            return logits
        logits = logits.clone()
        sub = [rows[i] for i in idx]
        counts = self._token_counts([r.output_ids for r in sub], logits.shape[1])
        in_prompt = self._token_counts([r.prompt_ids for r in sub], logits.shape[1]) > 0
        seen = in_prompt | (counts > 0)
        rep = self._column([r.params.repetition_penalty for r in sub])
        freq = self._column([r.params.frequency_penalty for r in sub])
        pres = self._column([r.params.presence_penalty for r in sub])
        rows_t = torch.tensor(idx, device=self.device)
        x = logits[rows_t]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - freq * counts - pres * (counts > 0).float()
        logits[rows_t] = x
        return logits

    def _apply_grammars(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        guided = [(i, r.params.guide) for i, r in enumerate(rows) if r.params.guide is not None]
        if not guided or self.guided is None:
            return logits
        return self.guided.mask_logits(logits, guided)

    def _mask_min_tokens(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        pairs = [
            (i, t)
            for i, r in enumerate(rows)
            if r.num_output < r.params.min_tokens
            for t in r.params.stop_ids
        ]
        if not pairs:
            return logits
        logits = logits.clone()
        rows_t, cols_t = torch.tensor(pairs, device=self.device).T
        logits[rows_t, cols_t] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, params: list[RequestSampling]) -> torch.Tensor:
        greedy_ids = logits.argmax(dim=-1)
        temp = self._column([max(p.temperature, _EPS) for p in params])
        probs = torch.softmax(logits / temp, dim=-1)
        probs = self._top_k_top_p(probs, params)
        min_p = [p.min_p for p in params]
        if any(m > 0 for m in min_p):
            floor = self._column(min_p) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        sampled = (probs / self._exponential_noise(probs, params)).argmax(dim=-1)
        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        return torch.where(greedy, greedy_ids, sampled)

    def _top_k_top_p(self, probs: torch.Tensor, params: list[RequestSampling]) -> torch.Tensor:
        vocab = probs.shape[1]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if all(k == vocab for k in top_k) and all(p >= 1.0 for p in top_p):
            return probs
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=self.device)[None, :]
        drop = ranks >= torch.tensor(top_k, device=self.device)[:, None]
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= self._column(top_p)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return torch.zeros_like(probs).scatter_(1, order, sorted_probs)

    def _exponential_noise(self, probs: torch.Tensor, params: list[RequestSampling]) -> torch.Tensor:
        """Exp(1) noise: argmax(p / q) draws from p (the exponential-race form of Gumbel-max)."""
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, p in enumerate(params):
            if p.generator is not None:
                noise[i].exponential_(generator=p.generator)
        return noise

    def collect(self, raw: torch.Tensor, sampled: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        """The sampled ids on the host, with logprobs (of the unpenalized `raw` logits) where asked."""
        params = [r.params for r in rows]
        want = [p.logprobs is not None for p in params]
        if not any(want):
            return SamplerOutput(token_ids=sampled.tolist(), rows_with_logprobs=want)
        logprobs = torch.log_softmax(raw, dim=-1)
        chosen = logprobs.gather(1, sampled[:, None])[:, 0]
        k = max(p.logprobs or 0 for p in params)
        top_vals, top_ids = logprobs.topk(max(k, 1), dim=-1)
        return SamplerOutput(
            token_ids=sampled.tolist(),
            logprobs=chosen.tolist(),
            top_ids=[ids[: p.logprobs or 0] for ids, p in zip(top_ids.tolist(), params, strict=True)],
            top_logprobs=[
                v[: p.logprobs or 0] for v, p in zip(top_vals.tolist(), params, strict=True)
            ],
            rows_with_logprobs=want,
        )

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=self.device, dtype=torch.float32)[:, None]

    def _token_counts(self, seqs: list[list[int]], vocab: int) -> torch.Tensor:
        counts = torch.zeros(len(seqs), vocab, device=self.device)
        width = max((len(s) for s in seqs), default=0)
        if width == 0:
            return counts
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=self.device)
        ones = torch.tensor(
            [[1.0] * len(s) + [0.0] * (width - len(s)) for s in seqs], device=self.device
        )
        return counts.scatter_add_(1, ids, ones)
