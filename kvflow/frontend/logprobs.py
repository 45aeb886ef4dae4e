"""Engine logprobs → OpenAI's shapes: chat `logprobs.content[]`, completions' parallel lists."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvflow.frontend.postprocess import TokenLogprobs
from kvflow.llm.openai import CompletionLogprobs, TokenLogprobOut, TopLogprobOut
from kvflow.llm.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The text of one token on its own (a partial UTF-8 character shows as U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: Tokenizer, lp: TokenLogprobs, top_n: int) -> list[TokenLogprobOut]:
    out = []
    for i, token_id in enumerate(lp.token_ids):
        text = token_text(tokenizer, token_id)
        tops = []
        if lp.top is not None and i < len(lp.top):
            for alt in lp.top[i][:top_n]:
                alt_text = token_text(tokenizer, alt.token_id)
                tops.append(TopLogprobOut(alt_text, alt.logprob, list(alt_text.encode())))
        logprob = lp.logprobs[i] if i < len(lp.logprobs) else 0.0
        out.append(TokenLogprobOut(text, logprob, list(text.encode()), tops))
    return out


@dataclass
class CompletionLogprobsBuilder:
    """Accumulates one completion choice's logprobs, tracking each token's text offset."""

    tokenizer: Tokenizer
    top_n: int
    offset: int = 0
    result: CompletionLogprobs = field(
        default_factory=lambda: CompletionLogprobs([], [], [], [])
    )

    def add(self, lp: TokenLogprobs) -> CompletionLogprobs:
        """Append `lp`; returns just the part it added (for a stream chunk)."""
        part = CompletionLogprobs([], [], [], [])
        for i, token_id in enumerate(lp.token_ids):
            text = token_text(self.tokenizer, token_id)
            part.tokens.append(text)
            part.token_logprobs.append(lp.logprobs[i] if i < len(lp.logprobs) else None)
            part.top_logprobs.append(self._top(lp, i))
            part.text_offset.append(self.offset)
            self.offset += len(text)
        whole = self.result
        whole.tokens.extend(part.tokens)
        whole.token_logprobs.extend(part.token_logprobs)
        whole.top_logprobs.extend(part.top_logprobs)
        whole.text_offset.extend(part.text_offset)
        return part

    def _top(self, lp: TokenLogprobs, i: int) -> dict[str, float] | None:
        if lp.top is None or i >= len(lp.top):
            return None
        alts = lp.top[i][: self.top_n]
        return {token_text(self.tokenizer, a.token_id): a.logprob for a in alts}
