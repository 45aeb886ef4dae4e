"""Scale events under load: a new worker takes traffic at once; a SIGTERMed one fails nothing."""

from __future__ import annotations

import asyncio
import random
import time

MAX_TOKENS = 60


class Load:
    """`concurrency` clients sending completions back to back until `total` are done."""

    def __init__(self, client, total: int, concurrency: int) -> None:
        self.client = client
        self.total = total
        self.concurrency = concurrency
        self.started = 0
        self.completed = 0
        self.failures: list[str] = []

    async def run(self) -> None:
        await asyncio.gather(*(self._loop(i) for i in range(self.concurrency)))

    async def _loop(self, i: int) -> None:
        rng = random.Random(i)
        while self.started < self.total:
            self.started += 1
            words = " ".join(rng.choice("abcdefghij") * 3 for _ in range(12))
            try:
                out = await self.client.completions.create(
                    model="m", prompt=words, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
            except Exception as exc:  # every failure is reported, none may happen
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if out.usage.completion_tokens != MAX_TOKENS:
                self.failures.append(f"short completion: {out.usage.completion_tokens}")
            self.completed += 1


async def _until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_added_worker_takes_traffic_within_2s(chaos) -> None:
    chaos.frontend()
    chaos.worker(speedup=2.0)
    await chaos.wait_workers(1)
    async with chaos.client() as client:
        load = Load(client, total=200, concurrency=12)
        running = asyncio.ensure_future(load.run())
        await _until(lambda: load.completed >= 20, 20)
        new = chaos.worker(speedup=2.0)
        await _until(new.registered, 20)
        registered_at = time.monotonic()
        await _until(lambda: new.generate_requests() > 0, 2.0)
        took = time.monotonic() - registered_at
        await running
    assert not load.failures, load.failures[:5]
    assert load.completed == 200
    assert took < 2.0


async def test_sigterm_under_load_fails_no_request(chaos) -> None:
    chaos.frontend()
    # A short drain on a slow worker: streams still running after it are cut and must migrate.
    doomed = chaos.worker(speedup=1.0, graceful_shutdown_timeout=0.02)
    chaos.worker(speedup=2.0)
    await chaos.wait_workers(2)
    async with chaos.client() as client:
        load = Load(client, total=200, concurrency=12)
        running = asyncio.ensure_future(load.run())
        await _until(lambda: load.completed >= 40 and doomed.metric("running_requests") >= 2, 20)
        doomed.proc.terminate(timeout=10)
        await running
    assert not load.failures, load.failures[:5]
    assert load.completed == 200
    assert chaos.migrations() >= 1  # streams cut by the drain moved on
