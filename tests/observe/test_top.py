"""`kvflow top`: the fleet view in a terminal, driven headless against a real stack."""

from __future__ import annotations

import asyncio
import html
import re
import subprocess
import sys

import openai
import pytest

pytest.importorskip("textual", reason="kvflow top needs the `top` extra (textual)")

from kvflow.cli.top import build_app, fetch_snapshot
from kvflow.cli.top_view import render_text


async def _traffic(base: str) -> None:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    for i in range(3):
        await client.completions.create(model="m", prompt="the same long system prompt " * 5 + str(i),
                                        max_tokens=4)
    await client.close()


async def test_top_follows_the_feed_headless(stack, model_dir) -> None:
    base = stack.frontend()
    stack.mocker(model_dir, "--num-workers", "2", "--block-size", "4")
    await stack.wait_workers(base, "m", 2)
    await _traffic(base)
    ids = {w["id"] for w in (await asyncio.to_thread(fetch_snapshot, base))["workers"]}
    assert len(ids) == 2
    app = build_app(base, None)
    async with app.run_test(size=(180, 50)) as pilot:
        for _ in range(100):
            if app.updates >= 2:
                break
            await pilot.pause(0.1)
        assert app.updates >= 2 and not app.error
        screen = html.unescape(re.sub(r"<[^>]+>", "", app.export_screenshot())).replace("\xa0", " ")
        for worker in ids:
            assert worker in screen
        assert "Last routing decisions" in screen and "the same long system prompt" in screen
        await pilot.press("q")


async def test_top_once_prints_the_fleet(stack, model_dir) -> None:
    base = stack.frontend("--api-key", "k")
    stack.mocker(model_dir, "--block-size", "4")
    await stack.wait_workers(base, "m", 1)
    snap = await asyncio.to_thread(fetch_snapshot, base, "k")
    text = render_text(snap)
    assert snap["workers"][0]["id"] in text and "aggregated" in text
    cmd = [sys.executable, "-m", "kvflow.cli.main", "top", "--url", base, "--once"]
    denied = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                     env=stack.env)
    assert denied.returncode == 1 and "401" in denied.stderr and "Traceback" not in denied.stderr
    ok = await asyncio.to_thread(subprocess.run, [*cmd, "--api-key", "k"], capture_output=True,
                                 text=True, env=stack.env)
    assert ok.returncode == 0 and snap["workers"][0]["id"] in ok.stdout, ok.stderr
