"""kvflow: distributed LLM serving — runtime, frontend, KV-aware router and engines."""

__version__ = "0.1.0"
