"""Per-token cost of guided decoding (llguidance) in the native engine, against unguided decoding.

    python bench/structured.py                    # CPU, batch 1 and 64, tiny random-weight llama
    python bench/structured.py --device cuda --hidden 2048 --layers 4 --vocab 32000

Each level runs `batch` requests at once through a real NativeEngine, twice: unguided
(ignore_eos, max_tokens) and guided by a JSON schema that keeps the model writing (an array
of at least 10000 small integers), same prompts and sampling. It prints µs per output token
(wall time ÷ tokens, best of --trials runs in alternating order), the guided/unguided ratio, and
the part of it spent computing
masks in llguidance (timed separately over the same token streams). Guided rows need their
previous token before the next step, so guided batches also give up async output
(which is off on CPU anyway; on CUDA it is part of the measured cost).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import msgspec

from kvflow.llm.protocol import StopConditions
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens
from kvflow.testing.models import make_tiny_model

SCHEMA = {"type": "json_schema", "json_schema": {"name": "nums", "schema": {
    "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
    "minItems": 10000}}}


async def run_level(engine, batch: int, max_tokens: int, guided: bool, tag: str
                    ) -> tuple[float, int, list[list[int]]]:
    fmt = SCHEMA if guided else None
    reqs = [greedy_request(f"{tag}-{i}", prompt_ids(16, seed=i), max_tokens, temperature=1.0,
                           seed=i, response_format=fmt) for i in range(batch)]
    if not guided:  # unguided rows run to max_tokens, as guided ones mostly do
        stop = StopConditions(max_tokens=max_tokens, ignore_eos=True)
        reqs = [msgspec.structs.replace(r, stop=stop) for r in reqs]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(collect(engine, r) for r in reqs))
    wall = time.perf_counter() - t0
    streams = [tokens(o) for o in outs]
    return wall, sum(len(s) for s in streams), streams


def mask_cost_us(model_dir: Path, vocab: int, streams: list[list[int]]) -> float:
    """µs per token to compute llguidance masks (in parallel per step, as the engine does)."""
    import torch
    from llguidance import LLExecutor, LLMatcher, LLTokenizer
    from llguidance.torch import fill_next_token_bitmask_par

    from kvflow.llm.structured import grammar_for

    tok = LLTokenizer((model_dir / "tokenizer.json").read_text(), n_vocab=vocab, eos_token=[1])
    grammar = grammar_for(SCHEMA)
    matchers = [LLMatcher(tok, grammar) for _ in streams]
    bits = torch.full((len(streams), (vocab + 31) // 32), -1, dtype=torch.int32)
    executor, spent, n = LLExecutor(), 0.0, 0
    for step in range(max(len(s) for s in streams)):
        live = [(m, j) for j, (m, s) in enumerate(zip(matchers, streams, strict=True))
                if step < len(s)]
        t0 = time.perf_counter()
        fill_next_token_bitmask_par(executor, live, bits)
        spent += time.perf_counter() - t0
        for m, j in live:
            m.consume_token(streams[j][step])
        n += len(live)
    return spent / max(n, 1) * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        heads = max(4, args.hidden // 128)  # 128-wide heads, as Llama-class models have
        path = make_tiny_model(Path(tmp) / "m", hidden_size=args.hidden, num_layers=args.layers,
                               intermediate_size=args.hidden * 2, vocab_size=args.vocab,
                               num_heads=heads, num_kv_heads=max(2, heads // 4))
        batches = [int(b) for b in args.batches.split(",")]
        engine = await small_native_engine(
            path, device=args.device, max_num_seqs=max(batches), num_gpu_blocks=4096,
            max_num_batched_tokens=max(1024, 16 * max(batches)), max_model_len=512,
            enforce_eager=args.device == "cpu")
        vocab = engine.runner.cfg.vocab_size
        try:
            await run_level(engine, 2, 8, True, "warm-g")
            await run_level(engine, 2, 8, False, "warm-u")
            print(f"device={args.device} vocab={vocab} hidden={args.hidden} layers={args.layers}")
            for b in batches:
                u_us, g_us, u_n, g_n, streams = float("inf"), float("inf"), 0, 0, []
                for t in range(args.trials):  # alternating order; best of each (load is noisy)
                    for guided in (t % 2 == 1, t % 2 == 0):
                        wall, n, got = await run_level(engine, b, args.max_tokens, guided,
                                                       f"{guided}{b}{t}")
                        if guided:
                            g_us, g_n, streams = min(g_us, wall / n * 1e6), n, got
                        else:
                            u_us, u_n = min(u_us, wall / n * 1e6), n
                mask = mask_cost_us(path, vocab, streams)
                print(f"batch {b:3d}: unguided {u_us:8.1f} µs/token ({u_n} tokens)  guided "
                      f"{g_us:8.1f} µs/token ({g_n} tokens)  ratio {g_us / u_us:.2f}x  "
                      f"(+{100 * (g_us / u_us - 1):.0f}%; llguidance masks {mask:.1f} µs/token)")
        finally:
            await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
