"""The vLLM adapter's pure parts (no vLLM needed): KV event translation and sampling-field mapping."""

from __future__ import annotations

import msgspec

from kvflow.engines.vllm.events import EventTranslator
from kvflow.engines.vllm.sampling import finish_reason, sampling_kwargs
from kvflow.llm.kv_events import AllCleared, BlocksRemoved, BlocksStored
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.llm.protocol import PreprocessedRequest, SamplingOptions, StopConditions
from kvflow.router.indexer import KvIndex


def stored(hashes: list, parent: object, tokens: list[int], medium: str = "GPU") -> dict:
    """A BlockStored as vLLM's msgspec encoder writes it (tagged map)."""
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": 4, "lora_id": None, "medium": medium, "lora_name": None,
            "group_idx": 0}


def batch(*events: dict) -> bytes:
    return msgspec.msgpack.encode([123.0, list(events)])  # EventBatch is array_like


def test_stored_blocks_get_kvflow_sequence_hashes_and_route() -> None:
    tokens = list(range(10, 22))  # 3 blocks of 4
    tr = EventTranslator(worker_id=5, block_size=4)
    first = tr.translate_payload(batch(stored([b"a", b"b"], None, tokens[:8])))
    second = tr.translate_payload(batch(stored([b"c"], b"b", tokens[8:12])))
    expected = sequence_hashes(tokens, 4)
    assert [b.block_hash for b in first[0].data.blocks] == expected[:2]
    assert second[0].data.parent_hash == expected[1]
    assert [b.block_hash for b in second[0].data.blocks] == expected[2:]
    assert [e.event_id for e in first + second] == [1, 2]
    index = KvIndex()
    for event in first + second:
        index.apply(event)
    assert index.find_matches(expected).score(5) == 3
    late = KvIndex()  # a router that missed the events recovers from the snapshot
    late.apply_snapshot(tr.snapshot())
    assert late.find_matches(expected).score(5) == 3 and late.last_event_id(5) == 2


def test_removed_and_cleared_are_translated_and_other_tiers_ignored() -> None:
    tr = EventTranslator(worker_id=1, block_size=4)
    tr.translate_payload(batch(stored([7, 8], None, list(range(8)))))
    out = tr.translate_payload(batch(
        stored([9], None, list(range(4)), medium="CPU"),
        {"type": "BlockRemoved", "block_hashes": [8, 99], "medium": "GPU"},
        {"type": "AllBlocksCleared"},
    ))
    assert isinstance(out[0].data, BlocksRemoved)
    assert out[0].data.block_hashes == [sequence_hashes(list(range(8)), 4)[1]]
    assert isinstance(out[1].data, AllCleared) and tr.hashes == {}
    assert not any(isinstance(e.data, BlocksStored) for e in out)


def test_sampling_fields_map_to_vllm() -> None:
    req = PreprocessedRequest(
        "r", list(range(10)), eos_token_ids=[2],
        sampling=SamplingOptions(temperature=0.5, top_p=0.9, top_k=-1, seed=3, logprobs=2),
        stop=StopConditions(max_tokens=None, min_tokens=1, stop_token_ids=[7]),
    )
    kw = sampling_kwargs(req, max_model_len=64)
    assert kw["temperature"] == 0.5 and kw["top_p"] == 0.9 and kw["top_k"] == 0 and kw["seed"] == 3
    assert kw["max_tokens"] == 54  # the rest of the context, not vLLM's default of 16
    assert kw["stop_token_ids"] == [7, 2] and kw["ignore_eos"] is False and kw["min_tokens"] == 1
    assert kw["detokenize"] is False and kw["logprobs"] == 2
    ignore = PreprocessedRequest(
        "r", [1], eos_token_ids=[2], stop=StopConditions(max_tokens=5, ignore_eos=True)
    )
    assert sampling_kwargs(ignore, 64)["stop_token_ids"] == []
    reasons = [finish_reason(r) for r in ("stop", "length", "abort", None)]
    assert reasons == ["stop", "length", "cancelled", None]
