"""kvflow.llm.tokenizer: loading, round trips, special tokens, checksum, thread safety."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvflow.llm.tokenizer import Tokenizer, TokenizerError
from kvflow.testing.tokenizer import BOS, EOS, IM_END, IM_START

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "你好，世界！北京是中国的首都。",  # noqa: RUF001
    "emoji 🎉🥳👨‍👩‍👧‍👦 flags 🇯🇵",
    "def f(x):\n    return x * 2\n",
    "mixed 中文 and English with 🤖 and\ttabs",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(any_tokenizer: Tokenizer, text: str) -> None:
    expected = text
    if any_tokenizer.token_to_id("<0x20>") is not None and text.startswith(" "):
        expected = text[1:]  # sentencepiece: a leading space merges into the dummy prefix
    assert any_tokenizer.decode(any_tokenizer.encode(text)) == expected


def test_add_special_tokens_prepends_bos(tokenizer: Tokenizer) -> None:
    bos = tokenizer.token_to_id(BOS)
    ids = tokenizer.encode("hi", add_special_tokens=True)
    assert ids[0] == bos
    assert ids[1:] == tokenizer.encode("hi")


def test_special_tokens(tokenizer: Tokenizer) -> None:
    control = {tokenizer.token_to_id(t) for t in (BOS, EOS, IM_START, IM_END)}
    assert control <= tokenizer.special_token_ids
    think = tokenizer.token_to_id("<think>")
    assert think is not None and think not in tokenizer.special_token_ids
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|><think>x</think>")
    assert ids[0] == tokenizer.token_to_id(IM_START)
    assert tokenizer.decode(ids) == "user\nhi<think>x</think>"
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user")


def test_vocab_lookups(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 512
    assert tokenizer.id_to_token(tokenizer.token_to_id(EOS)) == EOS
    assert tokenizer.id_to_token(10**6) is None
    assert tokenizer.token_to_id("definitely-not-a-token") is None


def test_checksum_is_sha256_of_file(model_dir: Path, tokenizer: Tokenizer) -> None:
    data = (model_dir / "tokenizer.json").read_bytes()
    assert tokenizer.checksum == hashlib.sha256(data).hexdigest()
    assert Tokenizer.from_file(model_dir / "tokenizer.json").checksum == tokenizer.checksum
    assert Tokenizer.from_bytes(data).checksum == tokenizer.checksum


def test_encode_batch_matches_encode(any_tokenizer: Tokenizer) -> None:
    assert any_tokenizer.encode_batch(TEXTS) == [any_tokenizer.encode(t) for t in TEXTS]


def test_thread_pool_use(tokenizer: Tokenizer) -> None:
    texts = [f"{t} #{i}" for i in range(50) for t in TEXTS]
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(tokenizer.encode, texts))
        back = list(pool.map(tokenizer.decode, ids))
    assert back == texts


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="could not be parsed"):
        Tokenizer.from_dir(tmp_path)
