"""Incremental detokenization: turn a stream of token ids into text deltas in O(1) per token.

Two strategies behind one class, picked per tokenizer:

- Byte-level tokenizers (GPT-2 style `ByteLevel` decoder: Llama 3, Qwen 2/3, Mistral Nemo...)
  decode by concatenating each token's bytes and reading them as UTF-8, so each token's bytes
  are looked up once (cached per tokenizer) and fed to an incremental UTF-8 decoder, which
  holds back an unfinished multi-byte character by itself. No tokenizer call per token.
- Any other tokenizer (sentencepiece `Metaspace` / `ByteFallback` decoders with their strip
  rules) uses the prefix-offset / read-offset window: keep a few ids; `prefix` ids are
  already emitted and only give context (a leading space, a strip rule); `read` marks where
  unemitted ids start. Each step decodes the window and emits the difference from the
  prefix's text, unless the text ends in U+FFFD (an incomplete multi-byte character); then
  it waits for more ids. After an emit the window slides forward, so the work per token does
  not grow with the length of the output.

Guarantee: with `prompt_ids=()`, the concatenation of every `push` and the final `flush`
equals `tokenizer.decode(all_ids, skip_special_tokens)`. With prompt ids, the text is the
continuation of the prompt: a sentencepiece tokenizer keeps the leading space of the first
output word that a standalone decode would strip. (Ids that are not valid UTF-8 are the
exception: a byte-fallback decoder turns a whole run of byte tokens into U+FFFD when any of
it is invalid, so a one-shot decode may lose valid bytes that the deltas kept.)
"""

from __future__ import annotations

import weakref
from codecs import utf_8_decode as _utf_8_decode
from collections.abc import Callable, Sequence

import tokenizers

from kvflow.llm.tokenizer import Tokenizer

# Prompt ids kept as context for the first output ids.
PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character is at most 4 bytes, so a text that still ends in U+FFFD after this many
# pending ids holds a genuinely invalid byte sequence; emit it rather than wait forever.
MAX_PENDING_TOKENS = 8
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Stateful detokenizer for one output sequence: `push(ids)` → new text, `flush()` at end."""

    __slots__ = ("flush", "push")

    push: Callable[[Sequence[int]], str]
    flush: Callable[[], str]

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        table = byte_table(tokenizer, skip_special_tokens)
        impl: _ByteStream | _WindowStream
        if table is not None:
            # Byte-level text needs no prompt context: no strip rules, and a prompt that ends
            # inside a character leaves the output decoded on its own, as documented.
            impl = _ByteStream(table)
        else:
            impl = _WindowStream(tokenizer, prompt_ids, skip_special_tokens)
        self.push = impl.push
        self.flush = impl.flush


# ---------------------------------------------------------------- byte-level tokenizers


class _ByteStream:
    """Token bytes through an incremental UTF-8 decode (U+FFFD for invalid bytes).

    `utf_8_decode(..., final=False)` stops before an unfinished character; its bytes wait in
    `_rest` for the next push (the same as codecs' incremental decoder, one call cheaper).
    """

    __slots__ = ("_rest", "_table")

    def __init__(self, table: TokenBytes) -> None:
        self._table = table
        self._rest = b""

    def push(self, token_ids: Sequence[int]) -> str:
        table = self._table
        if len(token_ids) == 1:
            data = table[token_ids[0]]
        else:
            data = b"".join([table[i] for i in token_ids])
        if self._rest:
            data = self._rest + data
        text, used = _utf_8_decode(data, "replace", False)
        self._rest = data[used:]
        return text

    def flush(self) -> str:
        """Emit what is pending (an unfinished character becomes U+FFFD)."""
        rest, self._rest = self._rest, b""
        return _utf_8_decode(rest, "replace", True)[0]


class TokenBytes(dict):
    """token id → the bytes the tokenizer's ByteLevel decoder makes of it; filled on demand."""

    def __init__(self, raw: tokenizers.Tokenizer, skip_special_tokens: bool) -> None:
        super().__init__()
        self._raw = raw
        added = raw.get_added_tokens_decoder().values()
        self._skipped = {t.content for t in added if t.special} if skip_special_tokens else set()

    def __missing__(self, token_id: int) -> bytes:
        token = self._raw.id_to_token(token_id)
        data = b"" if token is None or token in self._skipped else _token_bytes(token)
        self[token_id] = data
        return data


def _byte_decoder() -> dict[str, int]:
    """The GPT-2 byte ↔ printable-character table, character → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_decoder()


def _token_bytes(token: str) -> bytes:
    """A token string's bytes: mapped char by char, or (any unmapped char) its UTF-8 as is."""
    try:
        return bytes([_BYTE_OF_CHAR[c] for c in token])
    except KeyError:
        return token.encode("utf-8")


_TABLES: weakref.WeakKeyDictionary[Tokenizer, dict[bool, TokenBytes | None]] = (
    weakref.WeakKeyDictionary()
)


def byte_table(tokenizer: Tokenizer, skip_special_tokens: bool) -> TokenBytes | None:
    """The tokenizer's token-bytes table, or None when it is not a byte-level tokenizer."""
    per_skip = _TABLES.get(tokenizer)
    if per_skip is None:
        per_skip = _TABLES[tokenizer] = {}
    if skip_special_tokens not in per_skip:
        per_skip[skip_special_tokens] = _build_table(tokenizer, skip_special_tokens)
    return per_skip[skip_special_tokens]


def _build_table(tokenizer: Tokenizer, skip_special_tokens: bool) -> TokenBytes | None:
    raw = tokenizer.raw
    if not isinstance(raw, tokenizers.Tokenizer):
        return None
    if not isinstance(raw.decoder, tokenizers.decoders.ByteLevel):
        return None
    table = TokenBytes(raw, skip_special_tokens)
    return table if _agrees(raw, table, skip_special_tokens) else None


def _agrees(raw: tokenizers.Tokenizer, table: TokenBytes, skip: bool) -> bool:
    """Self-check against the tokenizer's own decode: every added token, 512 vocab ids."""
    ids = [*raw.get_added_tokens_decoder(), *range(min(512, raw.get_vocab_size()))]
    mine = b"".join(table[i] for i in ids).decode("utf-8", "replace")
    return mine == raw.decode(ids, skip_special_tokens=skip)


# ---------------------------------------------------------------- any other tokenizer


class _WindowStream:
    """The prefix/read window over the tokenizer's own decode (see the module docstring)."""

    __slots__ = ("_decode", "_ids", "_prefix_text", "_read", "_skip")

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip: bool) -> None:
        self._decode = tokenizer.raw.decode
        self._skip = skip
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
