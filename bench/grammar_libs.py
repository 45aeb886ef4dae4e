"""Which grammar library: compile time and per-token mask cost of llguidance, xgrammar, outlines-core.

    python bench/grammar_libs.py            # libraries that are not installed are skipped

Same tokenizer (the test tokenizer of kvflow.testing, the biggest vocabulary it trains),
same JSON schema, same walk: from the grammar's start, compute the allowed-token mask,
take a seeded random allowed token (never EOS until the grammar can end), consume it;
256 tokens per walk, 8 walks. Prints compile ms and µs per token spent in the library
(mask + consume), and each
library's ratio to llguidance (the baseline, measured in the same run).
"""

from __future__ import annotations

import importlib.util
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvflow.testing.tokenizer import make_model_dir

SCHEMA = {"type": "object", "properties": {
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "qty": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "qty"]}}}, "required": ["items"]}
STEPS, WALKS = 256, 8


def walk(fill: Callable[[], None], read: Callable[[], torch.Tensor],
         consume: Callable[[int], None], vocab: int, eos: int, seed: int) -> tuple[int, float]:
    """(tokens, seconds in the library: mask computation and consuming)."""
    rng = random.Random(seed)
    n, spent = 0, 0.0
    for _ in range(STEPS):
        t0 = time.perf_counter()
        fill()
        spent += time.perf_counter() - t0
        ids = [i for i in read().nonzero().flatten().tolist() if i < vocab and i != eos]
        if not ids:
            break
        token = rng.choice(ids)
        t0 = time.perf_counter()
        consume(token)
        spent += time.perf_counter() - t0
        n += 1
    return n, spent


def bits_to_bool(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits.view(-1, 1) >> shifts) & 1).view(-1)[:vocab].bool()


def llguidance_lib(model_dir: Path, vocab: int, eos: int):
    import llguidance

    tok = llguidance.LLTokenizer((model_dir / "tokenizer.json").read_text(), n_vocab=vocab,
                                 eos_token=eos)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    llguidance.LLMatcher(tok, grammar)
    compile_ms = (time.perf_counter() - t0) * 1e3
    bits = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def new():
        m = llguidance.LLMatcher(tok, grammar)

        def fill():
            m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
        return fill, lambda: bits_to_bool(bits, vocab), m.consume_token
    return compile_ms, new


def xgrammar_lib(model_dir: Path, vocab: int, eos: int):
    import transformers
    import xgrammar as xgr

    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_ms = (time.perf_counter() - t0) * 1e3
    bits = xgr.allocate_token_bitmask(1, vocab)

    def new():
        m = xgr.GrammarMatcher(compiled)

        def fill():
            m.fill_next_token_bitmask(bits)
        return fill, lambda: bits_to_bool(bits[0], vocab), m.accept_token
    return compile_ms, new


def outlines_lib(model_dir: Path, vocab: int, eos: int):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from kvflow.llm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    t0 = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    words: dict[str, list[int]] = {}
    for i in range(tok.vocab_size):
        if i == eos:
            continue
        text = tok.decode([i], skip_special_tokens=False)
        if text and "\ufffd" not in text:
            words.setdefault(text, []).append(i)
    index = Index(regex, Vocabulary(eos, words))
    compile_ms = (time.perf_counter() - t0) * 1e3

    def new():
        guide = Guide(index)
        state = {"allowed": guide.get_tokens()}

        def fill():  # outlines-core hands out the allowed ids as a list
            state["mask"] = torch.zeros(vocab, dtype=torch.bool)
            state["mask"][torch.tensor(state["allowed"], dtype=torch.long)] = True

        def consume(t: int) -> None:
            state["allowed"] = guide.advance(t)
        return fill, lambda: state["mask"], consume
    return compile_ms, new


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp) / "m", vocab_size=8192)
        config = json.loads((model_dir / "config.json").read_text())
        vocab, eos = config["vocab_size"], 1
        print(f"vocab={vocab}, {WALKS} walks of up to {STEPS} tokens")
        base = None
        for name, module, lib in [("llguidance", "llguidance", llguidance_lib),
                                  ("xgrammar", "xgrammar", xgrammar_lib),
                                  ("outlines-core", "outlines_core", outlines_lib)]:
            if importlib.util.find_spec(module) is None:
                print(f"{name:14s} not installed")
                continue
            compile_ms, new = lib(model_dir, vocab, eos)
            n, spent = 0, 0.0
            for seed in range(WALKS):
                got, secs = walk(*new(), vocab, eos, seed)
                n, spent = n + got, spent + secs
            us = spent / max(n, 1) * 1e6
            base = base or us
            print(f"{name:14s} compile {compile_ms:8.1f} ms   {us:8.1f} µs/token over {n} "
                  f"tokens   ({us / base:.2f}x llguidance)")


if __name__ == "__main__":
    main()
