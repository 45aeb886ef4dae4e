"""Incremental detokenization: turn a stream of token ids into text deltas in O(1) per token.

The prefix-offset / read-offset technique: keep a small window of ids. `prefix` ids are
already emitted and only give context (a leading space, a sentencepiece strip rule);
`read` marks where unemitted ids start. Each step decodes the window twice (with and
without the new ids) and emits the difference, unless the text ends in U+FFFD, which means
a multi-byte character is still incomplete; then it waits for more ids. After an emit the
window slides forward, so the work per token does not grow with the length of the output.

Guarantee: with `prompt_ids=()`, the concatenation of every `push` and the final `flush`
equals `tokenizer.decode(all_ids, skip_special_tokens)`. With prompt ids, the text is the
continuation of the prompt: a sentencepiece tokenizer keeps the leading space of the first
output word that a standalone decode would strip. (Ids that are not valid UTF-8 are the
exception: a byte-fallback decoder turns a whole run of byte tokens into U+FFFD when any of
it is invalid, so a one-shot decode may lose valid bytes that the deltas kept.)
"""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.llm.tokenizer import Tokenizer

# Prompt ids kept as context for the first output ids.
PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character is at most 4 bytes, so a text that still ends in U+FFFD after this many
# pending ids holds a genuinely invalid byte sequence; emit it rather than wait forever.
MAX_PENDING_TOKENS = 8
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Stateful detokenizer for one output sequence."""

    __slots__ = ("_decode", "_ids", "_prefix_text", "_read", "_skip")

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._decode = tokenizer.raw.decode
        self._skip = skip_special_tokens
        self._ids: list[int] = self._prompt_context(prompt_ids)
        # Window layout: self._ids[:self._read] is emitted context; the rest is pending.
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids, skip_special_tokens=self._skip)

    def _prompt_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """The last few prompt ids, starting on a character boundary where one is near.

        A window that starts inside a multi-byte character decodes to U+FFFD there, and a
        byte-fallback decoder may then garble the bytes that follow it too. A prompt that
        ends inside a character gives no context: the output is decoded on its own.
        """
        end = len(prompt_ids)
        first = max(end - PROMPT_CONTEXT_TOKENS, 0)
        for start in range(first, max(first - MAX_PENDING_TOKENS, 0) - 1, -1):
            ids = list(prompt_ids[start:])
            text = self._decode(ids, skip_special_tokens=self._skip)
            if not text.startswith(_REPLACEMENT):
                return [] if text.endswith(_REPLACEMENT) else ids
        return list(prompt_ids[first:])

    def push(self, token_ids: Sequence[int]) -> str:
        """Add new ids; return the text that is now final (possibly "")."""
        out = ""
        for token_id in token_ids:
            self._ids.append(token_id)
            out += self._step(force=False)
        return out

    def flush(self) -> str:
        """Emit whatever is still pending (an unfinished character becomes U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._step(force=True)

    def _step(self, force: bool) -> str:
        text = self._decode(self._ids, skip_special_tokens=self._skip)
        pending = len(self._ids) - self._read
        if not force and pending < MAX_PENDING_TOKENS:
            if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
                return ""
        delta = text[len(self._prefix_text) :]
        self._slide()
        return delta

    def _slide(self) -> None:
        """Make the pending ids the new context window."""
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids, skip_special_tokens=self._skip)
