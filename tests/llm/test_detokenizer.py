"""kvflow.llm.detokenizer: incremental text equals the full decode, under any chunking."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflow.llm.detokenizer import MAX_PENDING_TOKENS, PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer
from kvflow.llm.tokenizer import Tokenizer

PIECES = [
    "Hello", " world", "!", " ", "\n", "  ", "你好", "世界", "北京", "龘", "𠜎", "é", "ñ",
    "🎉", "🤖", "👨‍👩‍👧‍👦", "🇯🇵", "❤️", "def f(x):", "\treturn", "<think>", "</think>",
    "<|im_end|>", "<|im_start|>", "<tool_call>", "{\"a\": 1}", "123", "—", "…",
]
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

texts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=25).map("".join)


def chunk(ids: Sequence[int], cuts: list[int]) -> list[list[int]]:
    """Split ids at the given cut points (taken modulo the length)."""
    points = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    return [list(ids[a:b]) for a, b in itertools.pairwise(points)]


def stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    deltas = [detok.push(c) for c in chunks]
    return [*deltas, detok.flush()]


@SETTINGS
@given(text=texts, cuts=st.lists(st.integers(0, 200), max_size=12))
def test_chunked_stream_equals_full_decode(
    any_tokenizer: Tokenizer, text: str, cuts: list[int]
) -> None:
    ids = any_tokenizer.encode(text)
    deltas = stream(IncrementalDetokenizer(any_tokenizer), chunk(ids, cuts))
    assert "".join(deltas) == any_tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


@SETTINGS
@given(text=texts, skip=st.booleans())
def test_one_token_at_a_time(any_tokenizer: Tokenizer, text: str, skip: bool) -> None:
    ids = any_tokenizer.encode(text)
    detok = IncrementalDetokenizer(any_tokenizer, skip_special_tokens=skip)
    deltas = stream(detok, [[i] for i in ids])
    assert "".join(deltas) == any_tokenizer.decode(ids, skip_special_tokens=skip)
    assert all("\ufffd" not in d for d in deltas)


@SETTINGS
@given(prompt=texts, text=texts)
def test_with_prompt_is_the_continuation(any_tokenizer: Tokenizer, prompt: str, text: str) -> None:
    prompt_ids, ids = any_tokenizer.encode(prompt), any_tokenizer.encode(text)
    deltas = stream(IncrementalDetokenizer(any_tokenizer, prompt_ids), [[i] for i in ids])
    whole = any_tokenizer.decode(prompt_ids + ids)
    assert "".join(deltas) == whole[len(any_tokenizer.decode(prompt_ids)) :]


@SETTINGS
@given(ids=st.lists(st.integers(0, 511), max_size=40))
def test_arbitrary_ids_never_lose_text(tokenizer: Tokenizer, ids: list[int]) -> None:
    # Byte-level only: a byte-fallback decoder turns a whole run of byte tokens into U+FFFD
    # when the run holds any invalid UTF-8, so there a one-shot decode of garbage ids loses
    # valid bytes that the incremental path keeps.
    deltas = stream(IncrementalDetokenizer(tokenizer), [[i] for i in ids])
    assert "".join(deltas) == tokenizer.decode(ids)


def test_multibyte_character_is_held_until_complete(fallback_tokenizer: Tokenizer) -> None:
    ids = fallback_tokenizer.encode("🤖")
    pieces = [fallback_tokenizer.id_to_token(i) for i in ids]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]
    detok = IncrementalDetokenizer(fallback_tokenizer)
    deltas = [detok.push([i]) for i in ids]
    assert deltas[-4:] == ["", "", "", "🤖"]


def test_byte_level_split_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("龘")
    assert len(ids) > 1  # a rare character spans several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([i]) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "龘"


def test_sentencepiece_leading_space(fallback_tokenizer: Tokenizer) -> None:
    ids = fallback_tokenizer.encode("Hello world")
    alone = stream(IncrementalDetokenizer(fallback_tokenizer), [[i] for i in ids])
    assert "".join(alone) == "Hello world"
    prompt = fallback_tokenizer.encode("Say:")
    after_prompt = stream(IncrementalDetokenizer(fallback_tokenizer, prompt), [[i] for i in ids])
    assert "".join(after_prompt) == " Hello world"


def test_prompt_ending_inside_a_character(fallback_tokenizer: Tokenizer) -> None:
    ids = fallback_tokenizer.encode("ok 🤖 fine")
    cut = ids.index(fallback_tokenizer.token_to_id("<0x9F>"))
    prompt, output = ids[:cut], ids[cut:]
    deltas = stream(IncrementalDetokenizer(fallback_tokenizer, prompt), [[i] for i in output])
    assert "".join(deltas) == fallback_tokenizer.decode(output)


def test_unfinished_character_is_flushed_as_replacement(fallback_tokenizer: Tokenizer) -> None:
    ids = fallback_tokenizer.encode("ok 🤖")[:-1]
    detok = IncrementalDetokenizer(fallback_tokenizer)
    assert detok.push(ids) == "ok "
    assert detok.flush() == fallback_tokenizer.decode(ids)[len("ok ") :] == "\ufffd" * 3
    assert detok.flush() == ""


def test_special_tokens_skipped_or_kept(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>")
    skipped = stream(IncrementalDetokenizer(tokenizer), [[i] for i in ids])
    kept = stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=False), [[i] for i in ids])
    assert "".join(skipped) == "assistant\nHi"
    assert "".join(kept) == "<|im_start|>assistant\nHi<|im_end|>"


class CountingTokenizer(Tokenizer):
    """Records the length of every window the detokenizer decodes."""

    def __init__(self, inner: Tokenizer) -> None:
        super().__init__(inner.raw, inner.checksum)
        self.windows: list[int] = []
        decode = inner.raw.decode

        class Raw:
            def decode(_self, ids: list[int], skip_special_tokens: bool = True) -> str:
                self.windows.append(len(ids))
                return decode(ids, skip_special_tokens=skip_special_tokens)

        self.raw = Raw()  # type: ignore[assignment]


def test_work_per_token_is_bounded(tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode("你好世界 🤖 hello world, the quick brown fox. " * 200)
    detok = IncrementalDetokenizer(counting, ids[:50])
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids)
    assert max(counting.windows) <= PROMPT_CONTEXT_TOKENS + 2 * MAX_PENDING_TOKENS
    assert len(counting.windows) <= 2 * len(ids) + 2


def test_micro_benchmark(tokenizer: Tokenizer) -> None:
    """Not a timed assertion: prints µs per token for the record (-s to see it)."""
    ids = tokenizer.encode("The router looks at 你好世界 and 🤖 emoji. " * 300)
    detok = IncrementalDetokenizer(tokenizer)
    start = time.perf_counter()
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    per_token_us = (time.perf_counter() - start) / len(ids) * 1e6
    print(f"\nincremental detokenizer: {per_token_us:.2f} us/token over {len(ids)} tokens")
    assert text == tokenizer.decode(ids)
