"""Helpers for engine tests: prompts, requests, collected outputs, a small native engine."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from kvflow.engines.base import Engine, EngineHooks
from kvflow.llm.protocol import EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions
from kvflow.runtime.context import Context


def prompt_ids(n: int, seed: int, low: int = 3, high: int = 500) -> list[int]:
    """`n` reproducible token ids in [low, high) — above the fixture tokenizer's specials."""
    rng = random.Random(seed)
    return [rng.randrange(low, high) for _ in range(n)]


def greedy_request(rid: str, prompt: list[int], max_tokens: int, **sampling: Any) -> PreprocessedRequest:
    """A request with EOS id 1, greedy unless `sampling` says otherwise."""
    sampling.setdefault("temperature", 0.0)
    return PreprocessedRequest(
        request_id=rid, token_ids=prompt, eos_token_ids=[1],
        sampling=SamplingOptions(**sampling), stop=StopConditions(max_tokens=max_tokens),
    )


async def collect(engine: Engine, req: PreprocessedRequest, ctx: Context | None = None) -> list[EngineOutput]:
    return [out async for out in engine.generate(req, ctx or Context())]


def tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def small_native_engine(path: Path, hooks: EngineHooks | None = None, **overrides: Any) -> Any:
    """A started CPU NativeEngine with a small KV cache and a 16-token step budget."""
    from kvflow.engines.native.config import NativeEngineConfig
    from kvflow.engines.native.engine import NativeEngine

    config = {"device": "cpu", "block_size": 4, "num_gpu_blocks": 128, "max_num_seqs": 8,
              "max_num_batched_tokens": 16, "max_model_len": 256, **overrides}
    engine = NativeEngine(NativeEngineConfig(model_path=str(path), **config), hooks)
    await engine.start()
    return engine
