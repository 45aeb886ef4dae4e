"""Stalls: SIGSTOP the worker under live streams; they finish elsewhere; SIGCONT: it rejoins."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request

PROMPT = "the quick brown fox jumps over the lazy dog"
MAX_TOKENS = 200
STALL_S = 1.5
FLAGS = ("--router-mode", "round-robin", "--stall-timeout", str(STALL_S),
         "--stall-first-output-timeout", "3", "--canary-period", "0.5", "--canary-timeout", "0.5")


async def _stream(client, tokens: list[int], index: int) -> tuple[str, str | None, int]:
    stream = await client.completions.create(
        model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True})
    pieces, finish, usage = [], None, 0
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            tokens[index] += 1
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return "".join(pieces), finish, usage


def frontend_metric(url: str, name: str) -> float:
    """The sum of the frontend metric `name` (full name) over its labels."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    return sum(float(v) for v in found)


def endpoint_metric(worker, name: str) -> float:
    text = worker._get("/metrics").decode()
    found = re.findall(rf'^kvflow_endpoint_{name}\{{endpoint="[^"]*\.generate"\}} (\S+)$', text,
                       re.MULTILINE)
    return sum(float(v) for v in found)


async def test_sigstop_mid_stream_streams_finish_elsewhere_then_worker_rejoins(chaos) -> None:
    chaos.frontend(*FLAGS)
    workers = [chaos.worker(speedup=1.0), chaos.worker(speedup=1.0)]
    await chaos.wait_workers(2)
    client = chaos.client(timeout=60)
    t0 = time.monotonic()
    unbroken, finish, usage = await _stream(client, [0], 0)
    alone_s = time.monotonic() - t0
    assert (finish, usage) == ("length", MAX_TOKENS)

    hung = workers[0]
    before = endpoint_metric(hung, "requests_total")  # the first stream went to either
    tokens = [0] * 8
    tasks = [asyncio.ensure_future(_stream(client, tokens, i)) for i in range(8)]
    while min(tokens) < 10:  # every stream is producing
        await asyncio.sleep(0.02)
    hung.proc.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        elapsed = time.monotonic() - stopped_at
    finally:
        hung.proc.signal(signal.SIGCONT)
    for text, finish, usage in results:
        assert (finish, usage) == ("length", MAX_TOKENS)
        assert text == unbroken  # exact continuation: nothing lost, nothing repeated
    # The stall is seen after STALL_S; the moved streams then share one worker.
    print(f"alone {alone_s:.2f}s; all 8 done {elapsed:.2f}s after SIGSTOP")
    assert elapsed < STALL_S + 2 * alone_s + 10, (elapsed, alone_s)
    assert frontend_metric(chaos.url, "kvflow_frontend_stall_migrations_total") >= 4
    assert frontend_metric(chaos.url, "kvflow_frontend_stalls_total") >= 4

    # SIGCONT: its stale streams were cancelled (CANCEL was waiting in its socket), so it
    # stops at once instead of generating the rest of their MAX_TOKENS.
    deadline = time.monotonic() + 20
    while endpoint_metric(hung, "inflight_requests") > 0:
        assert time.monotonic() < deadline, "the resumed worker still runs its stale streams"
        await asyncio.sleep(0.05)
    assert endpoint_metric(hung, "requests_total") == before + 4  # round-robin: 4 of 8
    print("responses of the hung worker:", endpoint_metric(hung, "responses_total"))
    assert endpoint_metric(hung, "responses_total") < 4 * MAX_TOKENS / 2
    # It rejoins: re-registered, answers the canary, and takes new requests.
    await chaos.wait_workers(2)
    deadline = time.monotonic() + 20
    while endpoint_metric(hung, "requests_total") == before + 4:
        assert time.monotonic() < deadline, "the resumed worker gets no new requests"
        text, finish, _ = await _stream(client, [0], 0)
        assert text == unbroken and finish == "length"
    await client.close()
