"""kvflow sampling options and stop conditions as vLLM `SamplingParams` kwargs (no vLLM import)."""

from __future__ import annotations

from typing import Any

from kvflow.llm.protocol import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    PreprocessedRequest,
)

# Fields with the same meaning and name on both sides, copied when set.
_SAME = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
         "frequency_penalty", "repetition_penalty", "logprobs")

FINISH_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH, "abort": FINISH_CANCELLED,
                  "error": FINISH_ERROR}


def sampling_kwargs(request: PreprocessedRequest, max_model_len: int) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` (streamed as deltas, token ids only)."""
    sampling, stop = request.sampling, request.stop
    kwargs: dict[str, Any] = {k: v for k in _SAME if (v := getattr(sampling, k)) is not None}
    if kwargs.get("top_k") == -1:
        kwargs["top_k"] = 0  # both "no top-k"; vLLM spells it 0
    room = max(1, max_model_len - len(request.token_ids))
    kwargs["max_tokens"] = min(stop.max_tokens, room) if stop.max_tokens is not None else room
    if stop.min_tokens:
        kwargs["min_tokens"] = stop.min_tokens
    stop_ids = list(stop.stop_token_ids)
    if not stop.ignore_eos:
        stop_ids += [t for t in request.eos_token_ids if t not in stop_ids]
    kwargs.update(stop_token_ids=stop_ids, ignore_eos=stop.ignore_eos, n=sampling.n, detokenize=False)
    return kwargs


def finish_reason(vllm_reason: str | None) -> str | None:
    return None if vllm_reason is None else FINISH_REASONS.get(vllm_reason, FINISH_STOP)
