"""Embedding requests on the native engine's ordinary worker, checked against transformers.

Tolerance: float32 weights and activations on CPU; the engine's paged attention and fused
ops order sums differently from transformers', so vectors agree to an absolute 1e-4 per
component (cosine similarity above 1 - 1e-6).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvflow.llm.protocol import EmbedOptions, PreprocessedRequest, SamplingOptions
from kvflow.testing.engine_io import collect, greedy_request, prompt_ids, small_native_engine, tokens

ATOL = 1e-4


def embed_request(rid: str, prompt: list[int], **opts) -> PreprocessedRequest:
    return PreprocessedRequest(rid, prompt, sampling=SamplingOptions(), eos_token_ids=[1],
                               embed=EmbedOptions(**opts))


def reference(model_dir, prompt: list[int], pooling: str, normalize: bool, dims: int | None):
    import transformers

    model = transformers.AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        hidden = model(torch.tensor([prompt])).last_hidden_state[0]
    v = hidden.mean(dim=0) if pooling == "mean" else hidden[-1]
    v = v[:dims] if dims else v
    return torch.nn.functional.normalize(v, dim=0) if normalize else v


@pytest.fixture(scope="module")
def model_path(tiny_models):
    return tiny_models("llama")


@pytest.mark.parametrize(("pooling", "normalize", "dims"),
                         [("last", True, None), ("mean", True, None), ("last", False, None),
                          ("mean", True, 16)])
async def test_matches_transformers_across_prefill_chunks(model_path, pooling, normalize, dims):
    # 16-token step budget: a 40-token prompt is pooled over three prefill chunks.
    engine = await small_native_engine(model_path)
    try:
        prompt = prompt_ids(40, seed=3)
        out = await collect(engine, embed_request("e", prompt, pooling=pooling,
                                                  normalize=normalize, dimensions=dims))
        assert out[-1].finish_reason == "stop" and not tokens(out)
        got = torch.tensor(out[-1].embedding)
        want = reference(model_path, prompt, pooling, normalize, dims)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()
    finally:
        await engine.stop()


async def test_embeddings_and_generation_share_the_worker(model_path):
    engine = await small_native_engine(model_path)
    try:
        gen = greedy_request("g", prompt_ids(8, seed=1), max_tokens=12)
        alone = tokens(await collect(engine, gen))
        prompts = [prompt_ids(20 + i, seed=10 + i) for i in range(4)]
        embeds = [embed_request(f"e{i}", p, pooling="mean") for i, p in enumerate(prompts)]
        outs = await asyncio.gather(collect(engine, gen), *(collect(engine, r) for r in embeds))
        assert tokens(outs[0]) == alone  # generation is unaffected by the embedding rows
        for p, out in zip(prompts, outs[1:], strict=True):
            want = reference(model_path, p, "mean", True, None)
            assert torch.allclose(torch.tensor(out[-1].embedding), want, atol=ATOL)
        # The same prompt again (mean pooling never reuses cached blocks) gives the same vector.
        again = await collect(engine, embed_request("e-again", prompts[0], pooling="mean"))
        assert torch.allclose(torch.tensor(again[-1].embedding),
                              torch.tensor(outs[1][-1].embedding), atol=1e-6)
    finally:
        await engine.stop()


async def test_bad_options_fail_the_request(model_path):
    engine = await small_native_engine(model_path)
    try:
        out = await collect(engine, embed_request("b", [5, 6], pooling="cls"))
        assert out[-1].finish_reason == "error" and "pooling" in out[-1].error
        out = await collect(engine, embed_request("d", [5, 6], dimensions=10_000))
        assert "dimensions" in out[-1].error
    finally:
        await engine.stop()
