"""The batched sampler: greedy, seeds, top-k/top-p/min-p, penalties, min_tokens and logprobs."""

from __future__ import annotations

import torch

from kvflow.engines.native.sampler import RequestSampling, Sampler, SampleRow
from kvflow.llm.protocol import SamplingOptions, StopConditions

CPU = torch.device("cpu")
VOCAB = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def _row(output: list[int] | None = None, prompt: list[int] | None = None, **kw: object) -> SampleRow:
    params = RequestSampling.from_request(
        SamplingOptions(**{k: v for k, v in kw.items() if k not in ("min_tokens",)}),  # type: ignore[arg-type]
        StopConditions(min_tokens=kw.get("min_tokens")),  # type: ignore[arg-type]
        [7],
        CPU,
    )
    return SampleRow(params, prompt or [1, 2], output or [])


def test_greedy_is_argmax() -> None:
    logits = _logits(4)
    out = Sampler(CPU, 0)(logits, [_row(temperature=0.0) for _ in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_seeded_rows_repeat_whatever_their_batch() -> None:
    logits = _logits(3)
    alone = Sampler(CPU, 1)(logits[1:2], [_row(seed=42)]).token_ids
    draws = []
    for engine_seed in (1, 2):
        rows = [_row(), _row(seed=42), _row(temperature=0.5)]
        draws.append(Sampler(CPU, engine_seed)(logits, rows).token_ids[1])
    assert draws == [alone[0], alone[0]]


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-9] * (VOCAB - 3)]))
    sampler = Sampler(CPU, 3)
    counts = torch.zeros(VOCAB)
    for _ in range(600):
        counts[sampler(logits, [_row(temperature=1.0)]).token_ids[0]] += 1
    freq = counts[:3] / 600
    assert (freq - torch.tensor([0.7, 0.2, 0.1])).abs().max() < 0.07


def test_top_k_top_p_and_min_p_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (VOCAB - 4)]))
    sampler = Sampler(CPU, 4)
    cases = [({"top_k": 2}, {0, 1}), ({"top_p": 0.6}, {0, 1}), ({"min_p": 0.5}, {0, 1})]
    for kw, allowed in cases:
        seen = {sampler(logits, [_row(temperature=1.0, **kw)]).token_ids[0] for _ in range(200)}
        assert seen == allowed, kw


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 10.0  # EOS is the favourite
    sampler = Sampler(CPU, 0)
    early = sampler(logits, [_row(output=[3], temperature=0.0, min_tokens=2)]).token_ids[0]
    late = sampler(logits, [_row(output=[3, 4], temperature=0.0, min_tokens=2)]).token_ids[0]
    assert early != 7 and late == 7


def test_penalties_follow_the_openai_and_hf_formulas() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, :4] = torch.tensor([2.0, -2.0, 1.0, 1.0])
    row = _row(output=[0, 0, 2], prompt=[1], repetition_penalty=2.0, frequency_penalty=0.5,
               presence_penalty=0.25, temperature=0.0)
    processed = Sampler(CPU, 0)._penalize(logits, [row])
    # token 0: seen, 2.0 / 2 - 0.5*2 - 0.25; token 1: prompt only, -2.0 * 2;
    # token 2: 1.0 / 2 - 0.5 - 0.25; token 3: unseen.
    assert torch.allclose(processed[0, :4], torch.tensor([-0.25, -4.0, -0.25, 1.0]))


def test_logprobs_are_the_raw_log_softmax() -> None:
    logits = _logits(2, seed=5)
    out = Sampler(CPU, 0)(logits, [_row(temperature=0.0, logprobs=3), _row(temperature=0.0)])
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert abs(out.logprobs[0] - ref[0].max().item()) < 1e-6
    assert out.top_ids[0] == ref[0].topk(3).indices.tolist()
    assert out.top_ids[1] == [] and out.rows_with_logprobs == [True, False]
