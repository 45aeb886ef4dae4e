"""Cached prompt tokens of an agent conversation on /v1/messages, with and without the stable prefix.

    python bench/anthropic_prefix.py                 # 8 turns, block size 16
    python bench/anthropic_prefix.py --turns 16 --system-chars 8000

An agent resends its whole conversation every turn, with a system prompt whose last block
changes per request (a timestamp and a request id, as coding agents put the date, cwd and
git status there). The real scheduler and prefix-caching block pool of the mocker engine
run in-process behind the real frontend; the official `anthropic` client sends the turns.
Per mode it prints cached / prompt tokens summed over turns 2.. (turn 1 has nothing to hit)
and the ratio of the stable-prefix mode to the baseline (the option off), measured in the
same run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import anthropic

from kvflow.engines.mocker import MockerConfig, MockerEngine
from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.testing import start_served
from kvflow.llm.model_card import build_model_card
from kvflow.llm.tokenizer import Tokenizer
from kvflow.testing.tokenizer import make_model_dir

MODEL = "agent-model"


class LocalMocker:
    """An in-process MockerEngine as the frontend's EngineClient (one live worker)."""

    def __init__(self, engine: MockerEngine) -> None:
        self.engine = engine
        self.generate = engine.generate

    def live_workers(self) -> int:
        return 1


@dataclass
class TurnUsage:
    prompt: int
    cached: int


async def run_agent(stable: bool, model_dir: Path, turns: int, system_chars: int,
                    block_size: int) -> list[TurnUsage]:
    vocab = Tokenizer.from_dir(model_dir).vocab_size
    engine = MockerEngine(MockerConfig(speedup_ratio=0, vocab_size=vocab, block_size=block_size))
    await engine.start()
    served = await start_served(FrontendConfig(port=0, anthropic_stable_prefix=stable))
    served.add(build_model_card(str(model_dir), model_name=MODEL), LocalMocker(engine))
    client = anthropic.AsyncAnthropic(base_url=served.base_url, api_key="x", max_retries=0)
    rules = ("You are a careful coding agent. Follow the repository's conventions. " * 200)
    messages: list[dict] = []
    usage: list[TurnUsage] = []
    try:
        for turn in range(turns):
            system = [{"type": "text", "text": rules[:system_chars],
                       "cache_control": {"type": "ephemeral"}},
                      {"type": "text", "text": f"Now: {time.time_ns()} request {uuid.uuid4()}"}]
            messages.append({"role": "user", "content": f"Step {turn}: edit file {turn}.py " * 8})
            msg = await client.messages.create(model=MODEL, max_tokens=24, system=system,
                                               messages=messages)
            text = "".join(b.text for b in msg.content if b.type == "text")
            messages.append({"role": "assistant", "content": text or "ok"})
            u = msg.usage
            usage.append(TurnUsage(u.input_tokens + u.cache_read_input_tokens,
                                   u.cache_read_input_tokens))
    finally:
        await client.close()
        await served.close()
        await engine.stop()
    return usage


def summary(usage: list[TurnUsage]) -> tuple[int, int]:
    later = usage[1:]
    return sum(u.cached for u in later), sum(u.prompt for u in later)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--system-chars", type=int, default=4000)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    with TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp) / "model", max_position_embeddings=32768)
        results = {}
        for stable in (False, True):
            usage = await run_agent(stable, model_dir, args.turns, args.system_chars,
                                    args.block_size)
            results[stable] = summary(usage)
            name = "stable prefix" if stable else "baseline     "
            per_turn = " ".join(f"{u.cached}/{u.prompt}" for u in usage)
            cached, prompt = results[stable]
            print(f"{name}: cached/prompt per turn: {per_turn}")
            print(f"{name}: turns 2..{args.turns}: {cached}/{prompt} cached "
                  f"({100 * cached / max(prompt, 1):.1f}%)")
    base, stable_cached = results[False][0], results[True][0]
    print(f"cached tokens, stable / baseline: {stable_cached / max(base, 1):.1f}x "
          f"({stable_cached} vs {base})")


if __name__ == "__main__":
    asyncio.run(main())
