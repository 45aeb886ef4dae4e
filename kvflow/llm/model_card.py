"""The model card a worker publishes: what a frontend needs to serve a model it has never seen.

A worker calls `build_model_card(path)` and registers the card; a frontend calls
`materialize_card(card, cache_dir, fetch)` to get a local directory with the tokenizer and
template files, then builds `Tokenizer.from_dir` / `ChatTemplate.from_model_dir` from it.
Small files travel inline; large ones (a big tokenizer.json) by sha256, which the frontend
fetches from the worker (`read_card_file` answers such a fetch on the worker side).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from kvflow.llm.chat_template import TemplateError, load_template_source, special_tokens_of
from kvflow.llm.parsers.reasoning import get_reasoning_parser
from kvflow.llm.parsers.tool_calls import get_tool_parser, tool_parser_for_template
from kvflow.llm.tokenizer import TOKENIZER_FILE, Tokenizer
from kvflow.runtime.errors import UserError

CARD_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
HUB_PATTERNS = [*CARD_FILES, "tokenizer.model", "vocab.json", "merges.txt"]
CONTEXT_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
    "max_sequence_length", "model_max_length",
)
MODEL_INPUTS = ("tokens", "text")
MODEL_TYPES = ("chat", "completions", "embedding")
DEFAULT_KV_BLOCK_SIZE = 16
DEFAULT_INLINE_LIMIT = 512 * 1024


class ModelCardError(UserError, ValueError):
    """A model card could not be built or materialized; the message says what to do."""


class FileRef(msgspec.Struct, omit_defaults=True):
    """One model file: its size and sha256, its bytes when small, its path on the worker."""

    size: int
    sha256: str
    inline: bytes | None = None
    path: str = ""


class ModelCard(msgspec.Struct, omit_defaults=True):
    """Everything about a served model that is not weights."""

    name: str  # what clients send as "model"
    model_path: str  # local directory on the worker
    source: str  # hub id or path as the operator gave it
    tokenizer_checksum: str
    context_length: int
    kv_block_size: int = DEFAULT_KV_BLOCK_SIZE
    served_name: str | None = None  # the operator's --model-name, if any
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token_ids: list[int] = []
    special_tokens: dict[str, str] = {}
    model_input: str = "tokens"
    model_types: list[str] = msgspec.field(default_factory=lambda: ["chat", "completions"])
    migration_limit: int = 0
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    files: dict[str, FileRef] = {}
    # The engine can honour response_format (JSON schema / regex guided decoding).
    guided_decoding: bool = False
    checksum: str = ""


def card_checksum(card: ModelCard) -> str:
    """sha256 over what the card says about the model, stable across runs and machines.

    Where the files came from (`source`, `model_path`, file paths) and inline bytes (their
    sha256 counts) are left out, so two workers serving the same model from different
    paths agree.
    """
    files = {n: FileRef(r.size, r.sha256) for n, r in card.files.items()}
    portable = msgspec.structs.replace(card, checksum="", model_path="", source="", files=files)
    return hashlib.sha256(msgspec.msgpack.encode(portable, order="sorted")).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _looks_local(model_path: str) -> bool:
    return model_path.startswith(("/", ".", "~")) or model_path.count("/") > 1


def resolve_model_path(model_path: str) -> Path:
    """A local model directory as is; otherwise a Hugging Face Hub id, downloaded (config,
    tokenizer and template files only) into the hub cache."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelCardError(f"{model_path} is a file; pass the model's directory")
    if _looks_local(model_path):
        raise ModelCardError(f"model directory {model_path} does not exist; pass --model-path a directory "
                             "with tokenizer.json and config.json (or a Hugging Face hub id)")
    return _download(model_path)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (OSError, ValueError) as exc:
        raise ModelCardError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging "
            f"Face Hub ({hub_reason(exc)}).\nPass --model-path a local model directory, check the "
            "repo id, set HF_TOKEN for gated models; with HF_HUB_OFFLINE=1 only models "
            "already in the cache are found."
        ) from exc


def default_model_name(model_path: str) -> str:
    """A local directory's last component (`.kvflow/models/tiny` → `tiny`); a hub id as is."""
    path = Path(model_path).expanduser()
    return path.resolve().name if path.is_dir() else model_path


def hub_reason(exc: BaseException) -> str:
    """Why a hub download failed, in a few words (the hub's own messages run to paragraphs)."""
    text = str(exc)
    if "ConnectError" in text or "Name or service not known" in text or "offline" in text.lower():
        return "no network, and not in the local hub cache"
    if "RepositoryNotFound" in type(exc).__name__ or "404" in text:
        return "no such repository (or it is gated: set HF_TOKEN)"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelCardError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _context_length(config: dict[str, Any]) -> int | None:
    for scope in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _eos_ids(
    tokenizer: Tokenizer, specials: dict[str, str], config: dict[str, Any], gen: dict[str, Any]
) -> list[int]:
    """Union, in order: tokenizer_config eos_token, config.json and generation_config.json."""
    eos_token = specials.get("eos_token")
    first = tokenizer.token_to_id(eos_token) if eos_token else None
    ids = ([] if first is None else [first]) + _as_ids(config.get("eos_token_id"))
    return list(dict.fromkeys(ids + _as_ids(gen.get("eos_token_id"))))


def _file_ref(path: Path, inline_limit: int) -> FileRef:
    data = path.read_bytes()
    inline = data if len(data) <= inline_limit else None
    return FileRef(len(data), _sha256(data), inline, str(path.resolve()))


def _collect_files(
    root: Path, custom_template_path: str | None, inline_limit: int
) -> dict[str, FileRef]:
    files = {
        name: _file_ref(root / name, inline_limit)
        for name in CARD_FILES
        if (root / name).is_file()
    }
    if custom_template_path is not None:
        files["chat_template.jinja"] = _file_ref(Path(custom_template_path), inline_limit)
    return dict(sorted(files.items()))


def _template(root: Path, custom_template_path: str | None, tok_cfg: dict[str, Any]) -> str | None:
    try:
        return load_template_source(root, custom_template_path, tok_cfg)
    except TemplateError:
        if custom_template_path is not None:
            raise
        return None


def _check_options(
    model_input: str, model_types: Sequence[str], tool_parser: str | None,
    reasoning_parser: str | None,
) -> None:
    if model_input not in MODEL_INPUTS:
        raise ModelCardError(f"model_input must be one of {MODEL_INPUTS}, not {model_input!r}")
    unknown = [t for t in model_types if t not in MODEL_TYPES]
    if unknown or not model_types:
        raise ModelCardError(f"model_types must be a non-empty subset of {MODEL_TYPES}")
    if tool_parser not in (None, "none"):
        get_tool_parser(tool_parser)
    if reasoning_parser is not None:
        get_reasoning_parser(reasoning_parser)


def build_model_card(
    model_path: str,
    *,
    model_name: str | None = None,
    context_length: int | None = None,
    kv_cache_block_size: int | None = None,
    migration_limit: int | None = None,
    custom_template_path: str | None = None,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
    model_input: str = "tokens",
    model_types: Sequence[str] = ("chat", "completions"),
    inline_limit: int = DEFAULT_INLINE_LIMIT,
) -> ModelCard:
    """Read a model directory (or hub id) into a card, with its checksum filled in."""
    _check_options(model_input, model_types, tool_call_parser, reasoning_parser)
    root = resolve_model_path(model_path)
    if not (root / TOKENIZER_FILE).is_file():
        raise ModelCardError(
            f"{root} has no {TOKENIZER_FILE}; kvflow needs a fast tokenizer: save one with "
            f"transformers' AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    tok_cfg = _read_json(root / "tokenizer_config.json")
    config = _read_json(root / "config.json")
    tokenizer = Tokenizer.from_dir(root)
    template = _template(root, custom_template_path, tok_cfg)
    if template is None and "chat" in model_types:
        raise ModelCardError(
            f"{root} has no chat template, so it cannot serve chat; pass a template file "
            "(custom_template_path / --custom-jinja-template) or model_types=('completions',)"
        )
    if tool_call_parser is None:  # "none" turns the guess off
        tool_call_parser = tool_parser_for_template(template)
    tool_call_parser = None if tool_call_parser == "none" else tool_call_parser
    length = context_length or _context_length(config)
    if length is None:
        raise ModelCardError(
            f"cannot tell the context length of {root} (no max_position_embeddings or similar "
            "in config.json); pass context_length (--context-length)"
        )
    specials = special_tokens_of(root, tok_cfg)
    card = ModelCard(
        name=model_name or default_model_name(model_path),
        model_path=str(root.resolve()),
        source=model_path,
        tokenizer_checksum=tokenizer.checksum,
        context_length=length,
        kv_block_size=kv_cache_block_size or DEFAULT_KV_BLOCK_SIZE,
        served_name=model_name,
        chat_template=template,
        bos_token=specials.get("bos_token"),
        eos_token_ids=_eos_ids(tokenizer, specials, config, _read_json(
            root / "generation_config.json")),
        special_tokens=specials,
        model_input=model_input,
        model_types=list(model_types),
        migration_limit=migration_limit or 0,
        tool_call_parser=tool_call_parser,
        reasoning_parser=reasoning_parser,
        files=_collect_files(root, custom_template_path, inline_limit),
    )
    return msgspec.structs.replace(card, checksum=card_checksum(card))


def read_card_file(card: ModelCard, sha256: str) -> bytes:
    """Worker side of a fetch: the bytes of the card file with this sha256 (verified)."""
    for name, ref in card.files.items():
        if ref.sha256 == sha256:
            data = ref.inline if ref.inline is not None else Path(ref.path).read_bytes()
            if _sha256(data) != sha256:
                raise ModelCardError(f"{name} changed on disk since the card was built")
            return data
    raise ModelCardError(f"model {card.name!r} has no file with sha256 {sha256}")


def _safe_target(dest: Path, name: str) -> Path:
    if not name or Path(name).name != name or name in (".", ".."):
        raise ModelCardError(f"model card file name {name!r} is not a plain file name")
    return dest / name


def _file_bytes(name: str, ref: FileRef, fetch: Callable[[str], bytes] | None) -> bytes:
    if ref.inline is not None:
        return ref.inline
    if fetch is None:
        raise ModelCardError(
            f"{name} ({ref.size} bytes) is not inline in the card; pass fetch= to get it by sha256"
        )
    return fetch(ref.sha256)


def _write_atomic(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def materialize_card(
    card: ModelCard, dest_dir: str | Path, fetch: Callable[[str], bytes] | None = None
) -> Path:
    """Write the card's files into dest_dir (kept if already there with the right sha256).

    `fetch(sha256) -> bytes` gets files that are not inline. Every file is verified.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for name, ref in card.files.items():
        target = _safe_target(dest, name)
        if target.is_file() and _sha256(target.read_bytes()) == ref.sha256:
            continue
        data = _file_bytes(name, ref, fetch)
        if _sha256(data) != ref.sha256 or len(data) != ref.size:
            raise ModelCardError(
                f"{name} for model {card.name!r} failed its sha256 check; the worker's copy "
                "changed or the transfer was corrupted. Restart the worker to publish a new card."
            )
        _write_atomic(target, data)
    return dest
