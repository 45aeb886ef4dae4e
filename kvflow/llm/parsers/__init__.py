"""Output parsers that split generated text into reasoning, content and tool calls, streaming.

- reasoning.py: `<think>…</think>` reasoning parsers, registered by name.
- tool_calls.py: tool-call parsers (hermes, llama3_json, mistral), registered by name.
- tool_base.py: the tool-call result types and the streaming base class.
- registry.py: the name → class registry both kinds use.
- _stream.py: helpers for markers split across deltas and JSON values arriving in pieces.
"""
