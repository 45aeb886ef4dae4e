"""Guided decoding in the native engine: llguidance grammars as token masks on a step's logits.

`GuidedDecoding` is built once per engine from the model's tokenizer.json; `guide(fmt)`
gives a request its `Guide` (an llguidance matcher). Per step the sampler asks
`mask_logits` to compute the masks of the guided rows (in parallel on llguidance's own
threads, without the GIL) into a pinned bitmask, and sets disallowed logits to -inf on
the device. After the step's tokens reach the host the engine calls `Guide.advance`.
A grammar that has ended allows only EOS, so the request finishes as "stop".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvflow.llm.structured import GrammarError, grammar_for


@dataclass
class Guide:
    """One request's grammar state. `advance` after each sampled token."""

    matcher: Any  # llguidance.LLMatcher

    def advance(self, token_ids: list[int]) -> None:
        for t in token_ids:
            if self.matcher.is_stopped():
                return
            self.matcher.consume_token(t)

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


@dataclass
class GuidedDecoding:
    """Grammar compilation for one model's tokenizer, and the per-step mask buffers."""

    tokenizer: Any  # llguidance.LLTokenizer
    vocab_size: int
    device: torch.device
    _executor: Any = None
    _grammars: dict[str, str] = field(default_factory=dict)
    _bits: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model_dir: str | Path, vocab_size: int, eos_ids: list[int],
                  device: torch.device) -> GuidedDecoding:
        import llguidance

        text = (Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8")
        tok = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos_ids) or None)
        return cls(tok, vocab_size, device, llguidance.LLExecutor())

    def guide(self, fmt: dict[str, Any]) -> Guide:
        """A fresh matcher for `fmt`. Raises GrammarError when the grammar is unusable."""
        import llguidance

        key = json.dumps(fmt, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = grammar_for(fmt)
            if len(self._grammars) > 256:
                self._grammars.clear()
            self._grammars[key] = grammar
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the response format cannot be used: {matcher.get_error()}")
        return Guide(matcher)

    def mask_logits(self, logits: torch.Tensor, rows: list[tuple[int, Guide]]) -> torch.Tensor:
        """`logits` [B, V] with every token row i's grammar forbids set to -inf (a copy)."""
        from llguidance.torch import fill_next_token_bitmask_par

        bits = self._bitmask(len(rows))
        fill_next_token_bitmask_par(self._executor, [(g.matcher, j) for j, (_, g) in
                                                     enumerate(rows)], bits)
        mask = bits.to(logits.device, non_blocking=True)
        shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
        allowed = ((mask.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)
        allowed = allowed[:, : logits.shape[1]].bool()
        if allowed.shape[1] < logits.shape[1]:  # logits wider than the tokenizer's vocab
            pad = logits.shape[1] - allowed.shape[1]
            allowed = torch.nn.functional.pad(allowed, (0, pad), value=False)
        idx = torch.tensor([i for i, _ in rows], device=logits.device)
        logits = logits.clone()
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
        return logits

    def _bitmask(self, n: int) -> torch.Tensor:
        words = (self.vocab_size + 31) // 32
        if self._bits is None or self._bits.shape[0] < n:
            pin = self.device.type == "cuda"
            self._bits = torch.full((max(n, 8), words), -1, dtype=torch.int32, pin_memory=pin)
        return self._bits[:n]
