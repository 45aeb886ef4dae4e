"""A complete custom engine: reverse the prompt's tokens, one per step.

    python examples/custom_engine.py --model-path DIR        # then: kvflow frontend
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.llm.register import ModelInput, ModelType, register_llm
from kvflow.runtime import Context, DistributedRuntime, worker


class ReverseEngine:
    """Yields the prompt's tokens backwards; honours max_tokens and cancellation."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]:
        tokens = list(reversed(request.token_ids))[: request.stop.max_tokens or None]
        for i, token in enumerate(tokens):
            if context.is_stopped():
                yield EngineOutput(finish_reason="cancelled")
                return
            await asyncio.sleep(self.delay)
            last = i == len(tokens) - 1
            yield EngineOutput([token], finish_reason="stop" if last else None)


ARGS = argparse.ArgumentParser(description="a custom kvflow engine")
ARGS.add_argument("--model-path", required=True, help="HF-format directory with a tokenizer")
ARGS.add_argument("--model-name", default="reverse")
ARGS.add_argument("--delay", type=float, default=0.01)


@worker()
async def main(runtime: DistributedRuntime, args: argparse.Namespace) -> None:
    endpoint = runtime.namespace(runtime.config.namespace).component("reverse").endpoint("generate")
    await register_llm(ModelInput.Tokens, ModelType.Chat | ModelType.Completions,
                       endpoint, args.model_path, model_name=args.model_name)
    engine = ReverseEngine(args.delay)
    await endpoint.serve(engine.generate, request_type=PreprocessedRequest)


if __name__ == "__main__":
    main(ARGS.parse_args())
