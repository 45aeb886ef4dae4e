"""End to end: KV routing keeps shared prefixes and conversations together (real processes)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import openai

from kvflow.testing.routing_load import (
    ideal_cached_fraction,
    multi_turn,
    run_workload,
    shared_prefix,
)


async def _wait_model(base_url: str, timeout: float = 60.0) -> None:
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused") as client:
        deadline = time.monotonic() + timeout
        while not [m async for m in client.models.list()]:
            assert time.monotonic() < deadline, "the model never appeared"
            await asyncio.sleep(0.1)


def _frontend(stack, mode: str) -> str:  # type: ignore[no-untyped-def]
    proc = stack.start("frontend", "--http-port", "0", "--router-mode", mode, name="frontend")
    proc.wait_for_output("frontend: listening on", timeout=60)
    return re.search(r"listening on (http://\S+)", proc.output()).group(1)  # type: ignore[union-attr]


async def test_kv_routing_beats_round_robin_on_cached_tokens(stack, model_dir) -> None:
    # Two frontends (kv, round robin) over the same 4 mocker instances at realistic speed;
    # each sends its own seeded workload (no prefix in common with the other's).
    kv_url, rr_url = _frontend(stack, "kv"), _frontend(stack, "round-robin")
    stack.start("worker", "--engine", "mocker", "--model-path", str(model_dir), "--model-name",
                "m", "--num-workers", "4", "--speedup-ratio", "1", "--block-size", "16")
    await _wait_model(kv_url)
    await _wait_model(rr_url)
    await asyncio.sleep(1.0)  # every instance registered and its events followed

    def groups(seed: int):  # type: ignore[no-untyped-def]
        return shared_prefix(seed, groups=4, per_group=6, prefix=320, suffix=32, max_tokens=4,
                             clients=4)

    kv = await run_workload(kv_url + "/v1", "m", groups(1))
    rr = await run_workload(rr_url + "/v1", "m", groups(2))
    assert kv.failed == rr.failed == 0, (kv.errors, rr.errors)
    ideal = ideal_cached_fraction(groups(1), 16)
    # Round robin computes each group's prompt on up to every instance (~0.3 here); kv
    # keeps each group on one instance, near the ideal (~0.78).
    assert kv.cached_fraction > rr.cached_fraction + 0.15, (kv.cached_fraction,
                                                             rr.cached_fraction, ideal)
    assert kv.cached_fraction >= 0.8 * ideal, (kv.cached_fraction, ideal)

    # Conversations with an x-session-id: each turn lands where its history is.
    talks = multi_turn(3, users=4, turns=4, first=256, user_msg=64, reply=32, max_tokens=4,
                       clients=4, think_s=0.05)
    convo = await run_workload(kv_url + "/v1", "m", talks)
    assert convo.failed == 0, convo.errors
    assert convo.cached_fraction >= 0.9 * ideal_cached_fraction(talks, 16), (
        convo.cached_fraction, ideal_cached_fraction(talks, 16))

    # /debug/route explains the next turn: the session's worker, its history's blocks,
    # and each worker's cost terms (in blocks of prefill work).
    session = talks.sessions[0]
    body = json.dumps({"model": "m", "prompt": [*session.turns[-1].prompt, 20, 21]}).encode()
    req = urllib.request.Request(kv_url + "/debug/route", body, {
        "Content-Type": "application/json", "X-Session-Id": session.key or ""})
    decision = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(req).read()))
    history = (len(session.turns[-1].prompt)) // 16
    assert decision["session_blocks"] == history
    assert decision["worker_id"] == decision["session_worker"]
    terms = decision["terms"][str(decision["worker_id"])]
    assert terms["saved"] >= history and set(terms) == {"wait", "prefill", "saved", "decode",
                                                         "total"}
