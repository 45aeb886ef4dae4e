"""Render chat messages to a prompt with a model's Jinja chat template (Hugging Face semantics).

Templates run in jinja2's `ImmutableSandboxedEnvironment` with `trim_blocks` and
`lstrip_blocks`, the `raise_exception` and `strftime_now` globals, a `tojson` filter that keeps
non-ASCII and HTML characters as they are, and the `{% generation %}` block tag (rendered as
its body). Compiled templates are cached by source text.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON = "chat_template.json"
SPECIAL_TOKEN_FILE = "special_tokens_map.json"


class TemplateError(ValueError):
    """A chat template could not be found, compiled or rendered; the message says why."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for training masks; render it."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template has a syntax error at line {exc.lineno}: {exc}") from exc


def _token_text(value: Any) -> str:
    """A special token from a tokenizer config: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _flatten(content: Any) -> Any:
    """OpenAI list-of-parts content as one string (text parts joined by newlines)."""
    if not isinstance(content, list):
        return content
    texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return "\n".join(texts)


def _parse_arguments(call: Any) -> Any:
    """Tool-call arguments as an object: OpenAI sends a JSON string, templates expect a dict."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    args = call["function"].get("arguments")
    if not isinstance(args, str):
        return call
    try:
        parsed = json.loads(args)
    except ValueError:
        return call
    if not isinstance(parsed, dict):
        return call
    return {**call, "function": {**call["function"], "arguments": parsed}}


def _prepare(message: dict[str, Any], flatten: bool) -> dict[str, Any]:
    out = dict(message)
    if flatten and "content" in out:
        out["content"] = _flatten(out["content"])
    if out.get("tool_calls"):
        out["tool_calls"] = [_parse_arguments(c) for c in out["tool_calls"]]
    return out


def _final_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                return part["text"]
    raise TemplateError(
        "continue_final_message needs a final message with text content to continue"
    )


def _cut_after_final(rendered: str, final: str) -> str:
    """Drop what the template wrote after the final message's text (its end-of-turn)."""
    stripped = final.strip()
    at = rendered.rfind(stripped)
    if not stripped or at < 0:
        raise TemplateError(
            "continue_final_message is set but the final message's text does not appear in "
            "the rendered prompt; this template cannot continue a message"
        )
    keep = len(final.lstrip())
    if rendered[at : at + keep] == final.lstrip():
        return rendered[: at + keep]
    return rendered[: at + len(stripped)]


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        special_tokens: dict[str, str] | None = None,
        flatten_content: bool = True,
    ) -> None:
        self.source = source
        self.flatten_content = flatten_content
        self.special_tokens = {**(special_tokens or {}), "bos_token": bos_token,
                               "eos_token": eos_token}
        self._template = _compile(source)

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, custom_template_path: str | None = None
    ) -> ChatTemplate:
        """Load the template of a model dir (or a custom template file) and its special tokens."""
        root = Path(model_dir)
        config = _read_json(root / TOKENIZER_CONFIG)
        source = load_template_source(root, custom_template_path, config)
        specials = special_tokens_of(root, config)
        return cls(
            source,
            bos_token=specials.get("bos_token", ""),
            eos_token=specials.get("eos_token", ""),
            special_tokens=specials,
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        flatten_content: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`; extra kwargs reach the template as variables.

        `flatten_content` (default: the constructor's, True) joins list-of-parts content into
        one string for templates that expect strings; False passes the list through.
        """
        if continue_final_message and add_generation_prompt:
            raise TemplateError(
                "continue_final_message and add_generation_prompt are exclusive; the final "
                "message is continued, so set add_generation_prompt=False"
            )
        flatten = self.flatten_content if flatten_content is None else flatten_content
        prepared = [_prepare(m, flatten) for m in messages]
        context = {**self.special_tokens, **kwargs}
        rendered = self._render(
            messages=prepared, tools=tools, add_generation_prompt=add_generation_prompt, **context
        )
        if continue_final_message:
            if not messages:
                raise TemplateError("continue_final_message needs at least one message")
            rendered = _cut_after_final(rendered, _final_text(prepared[-1].get("content")))
        return rendered

    def _render(self, **variables: Any) -> str:
        try:
            return self._template.render(**variables)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TemplateError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _pick_named(templates: list[Any]) -> str | None:
    named = {t.get("name"): t.get("template") for t in templates if isinstance(t, dict)}
    if "default" in named:
        return named["default"]
    return next(iter(named.values()), None)


def _config_template(config: dict[str, Any]) -> str | None:
    value = config.get("chat_template")
    if isinstance(value, list):
        return _pick_named(value)
    return value if isinstance(value, str) else None


def load_template_source(
    root: Path, custom_template_path: str | None, config: dict[str, Any] | None = None
) -> str:
    """Template text: the custom file, else chat_template.jinja, chat_template.json, or the
    `chat_template` of tokenizer_config.json (a string, or named templates: "default" or first)."""
    if custom_template_path is not None:
        path = Path(custom_template_path)
        if not path.is_file():
            raise TemplateError(f"custom chat template file {path} does not exist")
        return path.read_text(encoding="utf-8")
    if (root / TEMPLATE_FILE).is_file():
        return (root / TEMPLATE_FILE).read_text(encoding="utf-8")
    source = _config_template(_read_json(root / TEMPLATE_JSON))
    source = source or _config_template(config if config is not None else
                                        _read_json(root / TOKENIZER_CONFIG))
    if not source:
        raise TemplateError(
            f"{root} has no chat template (looked in {TEMPLATE_FILE}, {TEMPLATE_JSON} and "
            f"{TOKENIZER_CONFIG}); pass a template file as custom_template_path "
            "(--custom-jinja-template) or serve the model for completions only"
        )
    return source


def special_tokens_of(root: Path, config: dict[str, Any] | None = None) -> dict[str, str]:
    """Named special tokens (bos_token, eos_token, pad_token, ...) of a model dir."""
    config = config if config is not None else _read_json(root / TOKENIZER_CONFIG)
    merged = {**_read_json(root / SPECIAL_TOKEN_FILE), **config}
    out: dict[str, str] = {}
    for key, value in merged.items():
        if key.endswith("_token") and _token_text(value):
            out[key] = _token_text(value)
    return out
