"""A thin, thread-safe wrapper over a Hugging Face `tokenizers.Tokenizer` loaded from tokenizer.json.

Only read-only calls are made on the underlying tokenizer after construction (no truncation or
padding changes), so one instance can serve many threads of a thread pool at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import tokenizers

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer could not be loaded; the message says which file and what to do."""


class Tokenizer:
    """Encode text to token ids and decode ids to text."""

    def __init__(self, raw: tokenizers.Tokenizer, checksum: str) -> None:
        self.raw = raw
        self.checksum = checksum
        self.vocab_size: int = raw.get_vocab_size(with_added_tokens=True)
        added = raw.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(
            idx for idx, tok in added.items() if tok.special
        )
        self.added_token_ids: frozenset[int] = frozenset(added)

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        """Build from the bytes of a tokenizer.json file."""
        try:
            raw = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception; bad UTF-8 too
            raise TokenizerError(f"tokenizer.json could not be parsed: {exc}") from exc
        return cls(raw, hashlib.sha256(data).hexdigest())

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file."""
        file = Path(path)
        if not file.is_file():
            raise TokenizerError(
                f"tokenizer file {file} does not exist; point at a tokenizer.json "
                "(only fast tokenizers with a tokenizer.json are supported)"
            )
        return cls.from_bytes(file.read_bytes())

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load `<model_dir>/tokenizer.json`."""
        path = Path(model_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(
                f"{model_dir} has no {TOKENIZER_FILE}; kvflow needs a fast tokenizer. "
                "Convert it once with transformers: "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        return cls.from_bytes(path.read_bytes())

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token markup in the text is recognised."""
        return self.raw.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        """Token ids of many texts (encoded in parallel by the Rust library)."""
        encodings = self.raw.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [enc.ids for enc in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 byte sequences become U+FFFD."""
        return self.raw.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of `token_id` (not decoded), or None if out of range."""
        return self.raw.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, or None if it is not in the vocabulary."""
        return self.raw.token_to_id(token)

    def added_tokens(self) -> dict[str, int]:
        """Added (special and control) tokens: their text → id."""
        return {t.content: i for i, t in self.raw.get_added_tokens_decoder().items()}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, checksum={self.checksum[:12]})"
