from __future__ import annotations

import asyncio

import pytest

from kvflow.runtime.tasks import cancel_and_wait


async def test_cancel_and_wait_ends_the_task_and_lets_its_cleanup_run() -> None:
    cleaned = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    task = asyncio.ensure_future(forever())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled() and cleaned == [True]
    await cancel_and_wait(task)  # already ended: nothing to do
    await cancel_and_wait(None)


async def test_a_cancelled_caller_is_still_cancelled() -> None:
    stuck = asyncio.Event()

    async def slow_cleanup() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stuck.set()
            await asyncio.sleep(10)

    inner = asyncio.ensure_future(slow_cleanup())
    await asyncio.sleep(0)
    outer = asyncio.ensure_future(cancel_and_wait(inner))
    await stuck.wait()
    outer.cancel()
    try:
        await outer
    except asyncio.CancelledError:
        pass
    assert outer.cancelled()
    inner.cancel()  # end its slow cleanup too
    await asyncio.wait({inner})


async def test_an_error_the_task_failed_with_is_raised() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.ensure_future(broken())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match=r"^boom$"):  # the task's error is not lost
        await cancel_and_wait(task)
