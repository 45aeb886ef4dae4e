"""kvflow.llm.chat_template: Hugging Face template semantics, errors and the sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow.llm.chat_template import ChatTemplate, TemplateError
from kvflow.testing.tokenizer import write_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
]


@pytest.fixture(scope="module")
def template(model_dir: Path) -> ChatTemplate:
    return ChatTemplate.from_model_dir(model_dir)


def test_chatml_with_generation_prompt(template: ChatTemplate) -> None:
    assert template.render(CHAT) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not template.render(CHAT, add_generation_prompt=False).endswith("assistant\n")


def test_continue_final_message(template: ChatTemplate) -> None:
    messages = [*CHAT, {"role": "assistant", "content": "The answer is"}]
    rendered = template.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert rendered.endswith("<|im_start|>assistant\nThe answer is")
    with pytest.raises(TemplateError, match="exclusive"):
        template.render(messages, continue_final_message=True)


def test_continue_keeps_trailing_space_the_template_kept(template: ChatTemplate) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]
    rendered = template.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert rendered.endswith("assistant\nSure, ")


def test_tools_reach_the_template(template: ChatTemplate) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    rendered = template.render(CHAT, tools=tools)
    assert '{"type": "function", "function": {"name": "get_weather"' in rendered
    assert rendered.startswith("<|im_start|>system\nBe brief.\n\n# Tools")


def test_tool_call_history(template: ChatTemplate) -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "巴黎"}'}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    rendered = template.render(messages)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "巴黎"}}\n</tool_call>' in (
        rendered)
    assert "<tool_response>\nsunny\n</tool_response>" in rendered


def test_list_content_is_flattened_or_passed_through(template: ChatTemplate) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "two"}]
    messages = [{"role": "user", "content": parts}]
    assert "user\none\ntwo<|im_end|>" in template.render(messages)
    raw = ChatTemplate("{{ messages[0].content | length }}")
    assert raw.render(messages, flatten_content=False) == "3"
    assert raw.render(messages) == str(len("one\ntwo"))


def test_kwargs_and_special_tokens_reach_the_template(template: ChatTemplate) -> None:
    off = template.render([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    custom = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ extra }}",
                          bos_token="<s>", eos_token="</s>", special_tokens={"pad_token": "<p>"})
    assert custom.render([], extra=7) == "<s>|</s>|<p>|7"


def test_helpers_tojson_strftime_generation_loopcontrols() -> None:
    source = (
        "{% generation %}{{ {'k': '<é>'} | tojson }}{% endgeneration %}"
        "|{{ [1, 2] | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}"
        "|{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    )
    assert ChatTemplate(source).render([]) == '{"k": "<é>"}|[\n  1,\n  2\n]|4|01'


def test_trim_and_lstrip_blocks() -> None:
    source = "{% for m in messages %}\n    {% if m.role %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}"
    assert ChatTemplate(source).render([{"role": "a"}, {"role": "b"}]) == "[a]\n[b]\n"


def test_raise_exception_is_a_template_error(template: ChatTemplate) -> None:
    with pytest.raises(TemplateError, match="Unknown role: robot"):
        template.render([{"role": "robot", "content": "beep"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ ().__class__.__base__.__subclasses__() }}",
        "{{ messages.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% set x = [] %}{{ x.append(1) }}",
    ],
)
def test_sandbox_blocks_escapes(source: str) -> None:
    with pytest.raises(TemplateError):
        ChatTemplate(source).render([])


def test_syntax_error_is_reported_with_line() -> None:
    with pytest.raises(TemplateError, match="line 2"):
        ChatTemplate("ok\n{% for %}")


def test_compiled_template_is_cached() -> None:
    source = "{{ messages | length }}"
    assert ChatTemplate(source)._template is ChatTemplate(source)._template


def test_template_sources(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, chat_template="from-config")
    assert ChatTemplate.from_model_dir(tmp_path).render([]) == "from-config"
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"},
                               {"name": "default", "template": "named-default"}]
    config_path.write_text(json.dumps(config))
    assert ChatTemplate.from_model_dir(tmp_path).render([]) == "named-default"
    (tmp_path / "chat_template.jinja").write_text("from-jinja-file")
    assert ChatTemplate.from_model_dir(tmp_path).render([]) == "from-jinja-file"
    custom = tmp_path / "custom.jinja"
    custom.write_text("custom {{ bos_token }}")
    assert ChatTemplate.from_model_dir(tmp_path, str(custom)).render([]) == (
        "custom <|begin_of_text|>")


def test_missing_template_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TemplateError, match="custom_template_path"):
        ChatTemplate.from_model_dir(tmp_path)
    with pytest.raises(TemplateError, match="does not exist"):
        ChatTemplate.from_model_dir(tmp_path, str(tmp_path / "nope.jinja"))
