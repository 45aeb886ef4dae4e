"""Pure parts of the fleet view: the router observer, token rates, the wire field for traces."""

from __future__ import annotations

import msgspec

from kvflow.frontend.fleet import TokenRates
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.llm.protocol import PreprocessedRequest
from kvflow.router import observe
from kvflow.router.blocks import BlockTable
from kvflow.router.cost import RoutingDecision

BLOCK = 4


def _decision(worker: int, overlaps: dict[int, int]) -> RoutingDecision:
    return RoutingDecision(worker, overlaps.get(worker, 0), 4, 16, 0.5, "kv", {}, overlaps, {})


def test_hot_prefixes_count_reuse_and_name_their_holders() -> None:
    table = BlockTable()
    prompt = list(range(16))
    hashes = sequence_hashes(prompt, BLOCK)
    table.store(1, hashes)
    table.store(2, hashes[:2])
    obs = observe.RouterObserver(BLOCK)
    obs.on_decision("r0", prompt, hashes, _decision(3, {}))  # nothing cached: not shared yet
    assert obs.hot_prefixes(table) == []
    for i in range(3):
        obs.on_decision(f"r{i + 1}", prompt, hashes, _decision(1, {1: 4, 2: 2}))
    obs.on_decision("r9", prompt, hashes, _decision(2, {2: 2}))
    hot = obs.hot_prefixes(table)
    assert [(h.blocks, h.hits, h.holders) for h in hot] == [(4, 3, [1]), (2, 1, [1, 2])]
    assert hot[0].preview == prompt
    assert len(obs.decisions) == 5


def test_prefix_table_and_decisions_stay_bounded() -> None:
    obs = observe.RouterObserver(BLOCK)
    for i in range(observe.MAX_PREFIXES * 2):
        tokens = [i] * 8
        obs.on_decision(str(i), tokens, sequence_hashes(tokens, BLOCK), _decision(1, {1: 2}))
    assert len(obs._prefixes) <= observe.MAX_PREFIXES
    assert len(obs.decisions) == observe.MAX_DECISIONS


def test_token_rates_over_a_window() -> None:
    rates = TokenRates()
    assert rates.update({"a": 0}, 100.0) == {"a": 0.0}
    assert rates.update({"a": 50, "b": 7}, 101.0) == {"a": 50.0, "b": 0.0}
    assert rates.update({"a": 150, "b": 27}, 102.0) == {"a": 75.0, "b": 20.0}


class _OldRequest(msgspec.Struct, omit_defaults=True):
    request_id: str
    token_ids: list[int]


def test_trace_context_is_an_optional_wire_field() -> None:
    new = PreprocessedRequest("r", [1, 2], trace_context="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=_OldRequest)  # an older peer
    assert old.token_ids == [1, 2]
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=PreprocessedRequest)
    assert back.trace_context is None
    assert b"trace_context" not in msgspec.msgpack.encode(PreprocessedRequest("r", [1]))
