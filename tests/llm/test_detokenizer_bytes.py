"""kvflow.llm.detokenizer's byte-level path: token bytes + incremental UTF-8 equal the tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken

from kvflow.llm.detokenizer import IncrementalDetokenizer, byte_table
from kvflow.llm.tokenizer import Tokenizer

SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def run(detok: IncrementalDetokenizer, ids: list[int], step: int) -> str:
    out = [detok.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    return "".join(out) + detok.flush()


def test_byte_level_tokenizers_take_the_byte_path(
    tokenizer: Tokenizer, fallback_tokenizer: Tokenizer
) -> None:
    assert byte_table(tokenizer, True) is not None
    assert byte_table(tokenizer, False) is not None
    # Metaspace / ByteFallback decoders keep the tokenizer's own decode (strip rules).
    assert byte_table(fallback_tokenizer, True) is None
    detok = IncrementalDetokenizer(tokenizer)
    assert type(detok.push.__self__).__name__ == "_ByteStream"  # type: ignore[attr-defined]


@SETTINGS
@given(
    ids=st.lists(st.integers(0, 520), max_size=60),
    skip=st.booleans(),
    step=st.integers(1, 7),
)
def test_any_ids_any_chunking_equal_the_full_decode(
    tokenizer: Tokenizer, ids: list[int], skip: bool, step: int
) -> None:
    # Includes invalid UTF-8 (lone continuation bytes, truncated characters), special and
    # added tokens, and ids past the vocabulary (which decode to nothing).
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    assert run(detok, ids, step) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_incomplete_character_waits_then_completes(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a 🤖 b")
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == "a 🤖 b"
    assert all("\ufffd" not in d for d in deltas)
    assert "🤖" in deltas  # the robot arrives whole, in one delta


def test_unfinished_character_flushes_as_replacement(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 龘")[:-1]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids) == "ok "
    assert detok.flush() == tokenizer.decode(ids)[len("ok ") :]
    assert detok.flush() == ""


@pytest.fixture(scope="module")
def odd_tokenizer(model_dir: Path) -> Tokenizer:
    """Added tokens the ByteLevel decoder treats differently: spaces, Latin-1, Ġ."""
    tok = Tokenizer.from_dir(model_dir)
    tok.raw.add_tokens([AddedToken("my tok", special=False), AddedToken("ü<x>", special=False),
                        AddedToken("ĠaĠ", special=False), AddedToken("<sp ü>", special=True)])
    return Tokenizer(tok.raw, tok.checksum + "-odd")


@pytest.mark.parametrize("skip", [True, False])
def test_odd_added_tokens_match_the_tokenizer(odd_tokenizer: Tokenizer, skip: bool) -> None:
    added = [odd_tokenizer.token_to_id(t) for t in ("my tok", "ü<x>", "ĠaĠ", "<sp ü>")]
    plain = odd_tokenizer.encode("x é y")
    ids = [plain[0], *added, *plain, *added[::-1]]
    assert byte_table(odd_tokenizer, skip) is not None
    for step in (1, 2, len(ids)):
        detok = IncrementalDetokenizer(odd_tokenizer, skip_special_tokens=skip)
        assert run(detok, ids, step) == odd_tokenizer.decode(ids, skip_special_tokens=skip)


def test_with_prompt_is_the_continuation(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Say: 你好")
    ids = tokenizer.encode(" world 🎉")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    whole = tokenizer.decode(prompt + ids)
    assert run(detok, ids, 1) == whole[len(tokenizer.decode(prompt)) :]
