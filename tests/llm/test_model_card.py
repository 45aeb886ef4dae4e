"""kvflow.llm.model_card: building a card from a model dir, checksums, and materializing it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import pytest

from kvflow.llm.chat_template import ChatTemplate
from kvflow.llm.model_card import (
    ModelCard,
    ModelCardError,
    build_model_card,
    card_checksum,
    materialize_card,
    read_card_file,
    resolve_model_path,
)
from kvflow.llm.tokenizer import Tokenizer
from kvflow.testing.tokenizer import EOS, IM_END, make_model_dir


@pytest.fixture()
def card_dir(tmp_path: Path) -> Path:
    root = make_model_dir(tmp_path / "model", max_position_embeddings=4096)
    config = json.loads((root / "config.json").read_text())
    config["eos_token_id"] = 42  # a third eos id, only in config.json
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_card_fields(card_dir: Path) -> None:
    tok = Tokenizer.from_dir(card_dir)
    card = build_model_card(str(card_dir), model_name="tiny", kv_cache_block_size=32,
                            tool_call_parser="hermes", reasoning_parser="qwen3")
    assert card.name == "tiny" and card.served_name == "tiny"
    assert card.source == str(card_dir)
    assert card.eos_token_ids == [tok.token_to_id(EOS), 42, tok.token_to_id(IM_END)]
    assert card.context_length == 4096 and card.kv_block_size == 32
    assert card.tokenizer_checksum == tok.checksum
    assert card.chat_template and "<|im_start|>" in card.chat_template
    assert card.bos_token == "<|begin_of_text|>"
    assert card.special_tokens["eos_token"] == EOS
    assert card.model_types == ["chat", "completions"] and card.model_input == "tokens"


def test_overrides(card_dir: Path) -> None:
    card = build_model_card(str(card_dir), context_length=512, migration_limit=3)
    assert card.name == card_dir.name and card.served_name is None
    assert card.context_length == 512 and card.migration_limit == 3


def test_checksum_is_stable_and_portable(card_dir: Path, tmp_path: Path) -> None:
    first = build_model_card(str(card_dir), model_name="tiny")
    assert build_model_card(str(card_dir), model_name="tiny").checksum == first.checksum
    assert card_checksum(first) == first.checksum
    assert build_model_card(str(card_dir), model_name="x").checksum != first.checksum
    moved = shutil.copytree(card_dir, tmp_path / "elsewhere")
    same = build_model_card(str(moved), model_name="tiny")
    assert same.checksum == first.checksum  # a different path on another worker agrees


def test_wire_round_trip(card_dir: Path) -> None:
    card = build_model_card(str(card_dir), inline_limit=1024)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(card), type=ModelCard)
    assert decoded == card and card_checksum(decoded) == card.checksum


def test_inline_and_referenced_files(card_dir: Path) -> None:
    card = build_model_card(str(card_dir), inline_limit=1024)
    tokenizer_ref = card.files["tokenizer.json"]
    assert tokenizer_ref.inline is None and tokenizer_ref.size > 1024
    assert card.files["generation_config.json"].inline is not None
    assert read_card_file(card, tokenizer_ref.sha256) == (card_dir / "tokenizer.json").read_bytes()


def test_materialize_round_trip(card_dir: Path, tmp_path: Path) -> None:
    card = build_model_card(str(card_dir), inline_limit=1024)
    fetched: list[str] = []

    def fetch(sha256: str) -> bytes:
        fetched.append(sha256)
        return read_card_file(card, sha256)

    dest = materialize_card(card, tmp_path / "cache", fetch)
    referenced = [ref.sha256 for ref in card.files.values() if ref.inline is None]
    assert "tokenizer.json" in card.files and fetched == referenced
    assert Tokenizer.from_dir(dest).checksum == card.tokenizer_checksum
    assert ChatTemplate.from_model_dir(dest).source == card.chat_template
    materialize_card(card, dest, fetch)  # already there: nothing fetched again
    assert fetched == referenced


def test_materialize_rejects_corrupt_data(card_dir: Path, tmp_path: Path) -> None:
    card = build_model_card(str(card_dir), inline_limit=1024)
    with pytest.raises(ModelCardError, match="sha256 check"):
        materialize_card(card, tmp_path / "bad", lambda sha: b"{}")
    with pytest.raises(ModelCardError, match="fetch="):
        materialize_card(card, tmp_path / "nofetch")


def test_materialize_rejects_path_names(card_dir: Path, tmp_path: Path) -> None:
    card = build_model_card(str(card_dir))
    evil = msgspec.structs.replace(card, files={"../x.json": card.files["config.json"]})
    with pytest.raises(ModelCardError, match="plain file name"):
        materialize_card(evil, tmp_path / "evil")


def test_custom_template_travels_with_the_card(card_dir: Path, tmp_path: Path) -> None:
    custom = tmp_path / "t.jinja"
    custom.write_text("{{ messages[0].content }}!")
    card = build_model_card(str(card_dir), custom_template_path=str(custom))
    assert card.chat_template == "{{ messages[0].content }}!"
    dest = materialize_card(card, tmp_path / "cache")
    assert ChatTemplate.from_model_dir(dest).render([{"role": "user", "content": "hi"}]) == "hi!"


def test_errors_say_what_to_do(card_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match="does not exist"):
        build_model_card(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="hermes"):
        build_model_card(str(card_dir), tool_call_parser="nope")
    with pytest.raises(ModelCardError, match="model_types"):
        build_model_card(str(card_dir), model_types=("chat", "images"))
    (card_dir / "config.json").unlink()
    with pytest.raises(ModelCardError, match="context_length"):
        build_model_card(str(card_dir))
    data = json.loads((card_dir / "tokenizer_config.json").read_text())
    del data["chat_template"]
    (card_dir / "tokenizer_config.json").write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match="no chat template"):
        build_model_card(str(card_dir), context_length=64)
    card = build_model_card(str(card_dir), context_length=64, model_types=("completions",))
    assert card.chat_template is None


def test_resolve_local_and_offline_hub(
    card_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_model_path(str(card_dir)) == card_dir
    with pytest.raises(ModelCardError, match="is a file"):
        resolve_model_path(str(card_dir / "config.json"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelCardError, match="Hugging Face Hub"):
        resolve_model_path("kvflow-test/not-a-real-model")
