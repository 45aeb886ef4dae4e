"""Write small, deterministic, real tokenizers and model dirs for tests (no downloads, no weights).

`make_model_dir(path)` gives a directory that `Tokenizer.from_dir`, `ChatTemplate.from_model_dir`,
`build_model_card` and `transformers.AutoTokenizer.from_pretrained` all accept. Two kinds:

- "byte_level": GPT-2 style byte-level BPE (every byte is a token; Ġ marks a space).
- "bpe_byte_fallback": sentencepiece style BPE with ▁ for spaces and `<0xNN>` byte tokens for
  characters outside the learned alphabet (most Chinese characters and emoji). Like Llama-3
  style Metaspace tokenizers, a dummy ▁ is prepended to the text and stripped on decode, so
  text that starts with a space loses that one space in a round trip.

Control tokens (`<|begin_of_text|>`, `<|end_of_text|>`, `<|im_start|>`, `<|im_end|>`) are
special: `decode(skip_special_tokens=True)` drops them. Markup tokens (`<think>`, `</think>`,
`<tool_call>`, `</tool_call>`, `[TOOL_CALLS]`) are single added tokens that stay in decoded
text, as in Qwen3 / Hermes / Mistral models, so reasoning and tool parsers can see them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from kvflow.testing._corpus import corpus_lines

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK = "<unk>"
CONTROL_TOKENS = (BOS, EOS, IM_START, IM_END)
THINK_TOKENS = ("<think>", "</think>")
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]")
KINDS = ("byte_level", "bpe_byte_fallback")
# Characters the byte-fallback tokenizer learns; everything rarer is spelled as <0xNN> bytes.
FALLBACK_ALPHABET_SIZE = 100

DEFAULT_CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable -%}{%- for part in content if part.type == 'text' -%}{{ part.text }}\
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages and messages[0].role == 'system' %}
{{- render_content(messages[0].content) + '\\n\\n' }}
{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions. Signatures are inside <tools></tools>:\\n' }}
{{- '<tools>' }}
{%- for tool in tools %}
{{- '\\n' + (tool | tojson) }}
{%- endfor %}
{{- '\\n</tools>\\n\\nReturn each call as <tool_call>{"name": <name>, "arguments": <object>}\
</tool_call>.<|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{ raise_exception('Only the first message may have role system.') }}\
{%- endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\\n' + render_content(message.content) + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content %}
{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
{%- endif %}
{{- render_content(message.content) }}
{%- for call in message.tool_calls or [] %}
{%- set fn = call.function if call.function is defined else call %}
{%- set args = fn.arguments if fn.arguments is string else (fn.arguments | tojson) %}
{{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' + args + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>tool\\n<tool_response>\\n' + render_content(message.content) }}
{{- '\\n</tool_response><|im_end|>\\n' }}
{%- else %}
{{- raise_exception('Unknown role: ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and not enable_thinking %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}
"""


def _byte_level_tokenizer(vocab_size: int, specials: list[str]) -> Tokenizer:
    """`vocab_size` counts the trained vocab: 256 byte symbols, specials and merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


def _byte_fallback_tokenizer(vocab_size: int, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    alphabet = _frequent_chars(FALLBACK_ALPHABET_SIZE)
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - 256, len(specials) + len(alphabet) + 16),
        special_tokens=specials,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return _insert_byte_tokens(tok, len(specials))


def _frequent_chars(n: int) -> list[str]:
    """The n most frequent corpus characters (ties broken by code point, so deterministic)."""
    counts = Counter("".join("▁" + line.replace(" ", "▁") for line in corpus_lines()))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [ch for ch, _ in ranked[:n]]


def _insert_byte_tokens(tok: Tokenizer, n_specials: int) -> Tokenizer:
    """Renumber the vocab as specials, then `<0x00>`..`<0xFF>`, then learned pieces."""
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    ordered = sorted(vocab, key=vocab.__getitem__)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    learned = [t for t in ordered[n_specials:] if t not in set(bytes_)]
    new_order = ordered[:n_specials] + bytes_ + learned
    data["model"]["vocab"] = {t: i for i, t in enumerate(new_order)}
    return Tokenizer.from_str(json.dumps(data))


def _add_markup_and_bos(tok: Tokenizer, markup: list[str]) -> None:
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in markup])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )


def build_tokenizer(
    *, vocab_size: int = 512, add_think_tokens: bool = True, kind: str = "byte_level"
) -> Tokenizer:
    """Train the test tokenizer in memory (deterministic; well under a second)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    specials = list(CONTROL_TOKENS)
    markup = [*(THINK_TOKENS if add_think_tokens else ()), *TOOL_TOKENS]
    trained_size = vocab_size - len(markup)
    if kind == "byte_level":
        tok = _byte_level_tokenizer(trained_size, specials)
    else:
        tok = _byte_fallback_tokenizer(trained_size, [*specials, UNK])
    _add_markup_and_bos(tok, markup)
    return tok


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for idx, added in sorted(tok.get_added_tokens_decoder().items()):
        out[str(idx)] = {
            "content": added.content,
            "special": added.special,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(
    model_dir: str | Path,
    *,
    vocab_size: int = 512,
    chat_template: str | None = None,
    add_think_tokens: bool = True,
    kind: str = "byte_level",
) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into model_dir."""
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size=vocab_size, add_think_tokens=add_think_tokens, kind=kind)
    tok.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK if kind == "bpe_byte_fallback" else None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "chat_template": chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    specials_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
    _write_json(out / "special_tokens_map.json", specials_map)
    return out


def _eos_from_tokenizer(model_dir: Path) -> list[int] | None:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    tok = Tokenizer.from_file(str(path))
    ids = [tok.token_to_id(t) for t in (EOS, IM_END)]
    return [i for i in ids if i is not None] or None


def write_config(
    model_dir: str | Path,
    *,
    max_position_embeddings: int = 2048,
    eos_token_id: int | list[int] | None = None,
    architecture: str = "LlamaForCausalLM",
    **extra: Any,
) -> Path:
    """Write a minimal config.json and generation_config.json (no weights).

    With `eos_token_id=None` and a tokenizer already in model_dir, config.json names
    `<|end_of_text|>` and generation_config.json names both it and `<|im_end|>`, the way
    chat models split their EOS ids across files.
    """
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    derived = _eos_from_tokenizer(out) if eos_token_id is None else None
    config_eos = derived[0] if derived else eos_token_id
    gen_eos = derived if derived else eos_token_id
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": "llama",
        "vocab_size": extra.pop("vocab_size", _vocab_size(out)),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": config_eos,
    }
    config.update(extra)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": gen_eos})
    return out


def _vocab_size(model_dir: Path) -> int:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return 512
    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def make_model_dir(path: str | Path, **kw: Any) -> Path:
    """A complete weightless model dir: write_tokenizer(...) then write_config(...).

    Keyword arguments go to whichever of the two accepts them; the rest go to config.json.
    """
    tok_keys = {"vocab_size", "chat_template", "add_think_tokens", "kind"}
    tok_kw = {k: v for k, v in kw.items() if k in tok_keys}
    cfg_kw = {k: v for k, v in kw.items() if k not in tok_keys}
    write_tokenizer(path, **tok_kw)
    return write_config(path, **cfg_kw)
