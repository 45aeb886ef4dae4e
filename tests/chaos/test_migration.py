"""Migration end to end: kill -9 the worker serving a stream; the client's stream goes on."""

from __future__ import annotations

from kvflow.testing.procs import Proc

PROMPT = "the quick brown fox jumps over the lazy dog"
MAX_TOKENS = 160


async def _stream(client, on_chunk=None, **kw) -> tuple[str, str | None, int]:
    stream = await client.completions.create(
        model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, **kw)
    pieces, finish, usage = [], None, 0
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            if on_chunk is not None:
                on_chunk(len(pieces))
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return "".join(pieces), finish, usage


async def test_kill_9_mid_stream_continues_on_the_other_worker(chaos) -> None:
    chaos.frontend()
    workers = [chaos.worker(speedup=1.0), chaos.worker(speedup=1.0)]
    await chaos.wait_workers(2)
    client = chaos.client()
    unbroken, finish, tokens = await _stream(client)
    assert finish == "length" and tokens == MAX_TOKENS
    killed: list[Proc] = []

    def kill_the_busy_worker(chunks: int) -> None:
        if chunks == 40 and not killed:
            busy = [w for w in workers if w.metric("running_requests") > 0]
            assert len(busy) == 1, "exactly one worker should be serving the stream"
            busy[0].proc.kill()  # SIGKILL: no drain, the connection just drops
            killed.append(busy[0].proc)

    text, finish, tokens = await _stream(client, kill_the_busy_worker)
    assert killed and not killed[0].alive()
    assert (finish, tokens) == ("length", MAX_TOKENS)
    assert text == unbroken  # nothing lost, nothing repeated
    assert chaos.migrations() >= 1
    # The survivor serves new requests while discovery forgets the dead one.
    again, finish, _ = await _stream(client)
    assert again == unbroken and finish == "length"
    await client.close()
