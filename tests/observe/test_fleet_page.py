"""The live fleet page in real headless Chromium: loads cleanly, shows workers as they come and go."""

from __future__ import annotations

import asyncio
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (scripts/dev.sh test installs it)")
KEY = "fleet-key"


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


async def _tiles(page: object, count: int, timeout_s: float = 30) -> list[str]:
    """The worker ids on the page once it shows `count` tiles."""
    for _ in range(int(timeout_s / 0.2)):
        ids = await page.eval_on_selector_all(  # type: ignore[attr-defined]
            ".tile", "tiles => tiles.map(t => t.dataset.worker)")
        if len(ids) == count:
            return ids
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the page never showed {count} worker tiles (last: {ids})")


async def _load(client: openai.AsyncOpenAI) -> None:
    while True:
        await client.completions.create(model="m", prompt="a shared system prompt " * 6 + "load",
                                        max_tokens=32)


async def test_fleet_page_in_headless_chromium(stack, model_dir, tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright")
    base = stack.frontend("--api-key", KEY)
    assert _status(base + "/fleet") == 401
    assert _status(base + "/fleet/snapshot", {"authorization": f"Bearer {KEY}"}) == 200
    stack.mocker(model_dir, "--block-size", "4")
    await stack.wait_workers(base, "m", 1)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY)
    for i in range(3):
        await client.completions.create(model="m", prompt="a shared system prompt " * 6 + str(i),
                                        max_tokens=4)

    errors: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(f"{base}/fleet?key={KEY}")
        first = await _tiles(page, 1)
        stack.mocker(model_dir, "--block-size", "4")  # a second worker process joins
        both = await _tiles(page, 2)
        assert set(first) < set(both)
        joined = (set(both) - set(first)).pop()
        for i in range(4):  # traffic while both are up: decisions name both candidates
            await client.completions.create(model="m", prompt="a shared system prompt " * 6 + f"x{i}",
                                            max_tokens=4)
        await page.wait_for_function("document.querySelectorAll('#decisions tr').length >= 4")
        decisions = await page.inner_text("#decisions")
        assert joined in decisions and first[0] in decisions
        assert "a shared system prompt" in await page.inner_text("#prefixes")
        updates = int(await page.inner_text("#updates"))
        load = asyncio.ensure_future(_load(client))  # tokens flow while the page updates
        await asyncio.sleep(1.5)
        assert int(await page.inner_text("#updates")) >= updates + 2  # at least 1 per second
        await page.wait_for_function(
            r"[...document.querySelectorAll('.tile')].some(t => /\b[1-9][0-9.]* tok\/s/.test(t.innerText))")
        shot = Path(os.environ.get("KVFLOW_TEST_ARTIFACTS", tmp_path)) / "fleet.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(shot), full_page=True)
        load.cancel()
        stack.procs[-1].kill()  # the second worker dies: its tile goes
        assert await _tiles(page, 1) == first
        await browser.close()
    await client.close()
    assert errors == [], errors


async def test_fleet_page_shows_pools_kv_transfers_and_the_planner(stack, model_dir) -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright")
    base = stack.frontend("--disagg-mode", "always")
    stack.mocker(model_dir, "--role", "prefill")
    stack.mocker(model_dir, "--role", "decode")
    await stack.wait_workers(base, "m", 1)  # the decode pool serves; prefill stays behind it
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    for _ in range(50):  # until the prefill pool is known and a request took the remote path
        await client.completions.create(model="m", prompt="a long prompt to prefill " * 30,
                                        max_tokens=2)
        if (await asyncio.to_thread(stack.get_json, base + "/fleet/snapshot"))["transfers"]:
            break
        await asyncio.sleep(0.2)
    await client.close()
    # an advisory planner beside the stack: its decisions reach the page over the event plane
    stack.start("planner", "--frontend-urls", base, "--model", "m", "--interval-s", "0.3",
                name="planner")
    errors: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(f"{base}/fleet")
        await page.wait_for_function("document.querySelectorAll('#transfers tr').length >= 1")
        tiles = await page.inner_text("#tiles")
        assert "prefill \u00b7 m" in tiles and "decode \u00b7 m" in tiles
        row = await page.inner_text("#transfers tr")
        assert "\u2192" in row and "shm" in row
        assert await page.is_visible("#transfers-section")
        await page.wait_for_function("document.querySelectorAll('#planner tr').length == 1",
                                     timeout=30_000)
        planner = await page.inner_text("#planner tr")
        assert "\tm\t" in planner and "advisory" in planner and "aggregated" in planner
        await browser.close()
    assert errors == [], errors
