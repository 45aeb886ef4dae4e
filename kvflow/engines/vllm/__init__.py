"""The vLLM engine adapter, registered as "vllm"; vLLM itself is imported only when a worker builds it.

- events.py: vLLM's ZMQ KV events → kvflow KvEvents (re-hashed with kvflow.llm.kv_hash), the relay.
- sampling.py: kvflow sampling options / stop conditions → vLLM SamplingParams kwargs.
- engine.py: VllmEngine (AsyncLLM), needs `vllm` (`bash scripts/dev.sh engine vllm`).

`kvflow worker --engine vllm --model-path DIR [-- vLLM engine args]`.
"""

from __future__ import annotations

import argparse

from kvflow.engines.adapter import EngineAdapter
from kvflow.engines.base import EngineHooks, EngineSpec, register_engine
from kvflow.runtime.errors import UserError


class VllmUnavailableError(UserError):
    """vLLM is not importable in this worker's environment."""


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vllm engine")
    group.add_argument(
        "vllm_args", nargs="*", metavar="-- VLLM_ARGS",
        help="vLLM engine arguments after `--` (e.g. -- --block-size 32 --max-model-len 2048)",
    )


def _build(ns: argparse.Namespace, hooks: EngineHooks) -> EngineAdapter:
    try:
        from kvflow.engines.vllm.engine import VllmEngine
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith(("vllm", "torch")):
            raise
        raise VllmUnavailableError(
            f"--engine vllm needs vLLM in this Python ({exc.name} is missing); make its venv with "
            "`bash scripts/dev.sh engine vllm` and start the worker with .venv-vllm/bin/python"
        ) from None
    return VllmEngine.from_args(ns, hooks)


SPEC = register_engine(EngineSpec(name="vllm", add_args=add_vllm_args, build=_build))
