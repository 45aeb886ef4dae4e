"""Tool calls: the parser comes from the chat template when recognisable; without one, warn once."""

from __future__ import annotations

import asyncio
import json

import openai

from kvflow.llm.model_card import build_model_card
from kvflow.llm.parsers.tool_calls import tool_parser_for_template

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_template_markers_pick_the_parser(model_dir) -> None:
    assert tool_parser_for_template("... <tool_call> ...") == "hermes"
    assert tool_parser_for_template("[TOOL_CALLS] [") == "mistral"
    assert tool_parser_for_template("<|python_tag|>") == "llama3_json"
    assert tool_parser_for_template("{{ messages }}") is None
    assert build_model_card(str(model_dir), tool_call_parser="none").tool_call_parser is None


async def _served(client: openai.AsyncOpenAI) -> None:
    for _ in range(300):
        if [m async for m in client.models.list()]:
            return
        await asyncio.sleep(0.05)


async def test_parser_from_template_and_warning(stack, model_dir, tmp_path) -> None:
    template = tmp_path / "hermes.jinja"  # a template in the hermes format: content only, for echo
    template.write_text("{#- tools as <tool_call> JSON -#}{% for m in messages %}{{ m.content }}{% endfor %}")
    base = stack.frontend()
    stack.start("worker", "--engine", "echo", "--model-path", str(model_dir), "--model-name", "auto",
                "--custom-template", str(template), name="worker")
    stack.start("worker", "--engine", "echo", "--model-path", str(model_dir), "--model-name", "plain",
                "--custom-template", str(template), "--tool-call-parser", "none", name="worker")
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    await _served(client)
    for _ in range(100):
        if len([m async for m in client.models.list()]) == 2:
            break
        await asyncio.sleep(0.05)
    msg = [{"role": "user", "content": CALL}]
    out = await client.chat.completions.create(model="auto", messages=msg, tools=TOOLS, tool_choice="auto")
    calls = out.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    for _ in range(2):
        out = await client.chat.completions.create(model="plain", messages=msg, tools=TOOLS)
        assert not out.choices[0].message.tool_calls
    frontend_log = stack.procs[0].output()
    assert frontend_log.count("model plain: a request carries tools, but the model has no tool-call") == 1
    assert "--tool-call-parser" in frontend_log
    await client.close()
