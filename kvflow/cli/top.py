"""`kvflow top`: the live fleet view in a terminal, from a frontend's /fleet/events feed.

    kvflow top [--url http://127.0.0.1:8000] [--api-key KEY] [--once]

Needs the `top` extra (textual). `--once` prints one snapshot as text and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

FEED = "/fleet/events"
SNAPSHOT = "/fleet/snapshot"


def _request(url: str, api_key: str | None) -> urllib.request.Request:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return urllib.request.Request(url, headers=headers)


def fetch_snapshot(base: str, api_key: str | None = None) -> dict[str, Any]:
    with urllib.request.urlopen(_request(base.rstrip("/") + SNAPSHOT, api_key), timeout=10) as r:
        return json.loads(r.read())


def follow(base: str, api_key: str | None = None) -> Iterator[dict[str, Any]]:
    """Snapshots from the SSE feed as they arrive (blocking; ends when the server does)."""
    with urllib.request.urlopen(_request(base.rstrip("/") + FEED, api_key), timeout=30) as resp:
        for raw in resp:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data: "):
                yield json.loads(line[6:])


def build_app(base: str, api_key: str | None) -> Any:
    from textual.app import App, ComposeResult
    from textual.widgets import Footer, Header, Static
    from textual.worker import get_current_worker

    from kvflow.cli.top_view import fleet_view

    class FleetTop(App):
        """Redraws the fleet view on every snapshot of the feed."""

        TITLE = "kvflow top"
        BINDINGS = [("q", "quit", "Quit")]

        def __init__(self) -> None:
            super().__init__()
            self.snapshot: dict[str, Any] | None = None
            self.updates = 0
            self.error = ""

        def compose(self) -> ComposeResult:
            yield Header(show_clock=True)
            yield Static("connecting to " + base, id="fleet")
            yield Footer()

        def on_mount(self) -> None:
            self.sub_title = base
            self.run_worker(self._follow, thread=True, exclusive=True)

        def _follow(self) -> None:
            worker = get_current_worker()
            try:
                for snap in follow(base, api_key):
                    if worker.is_cancelled:
                        return
                    self.call_from_thread(self.show, snap)
            except (OSError, ValueError) as exc:
                self.call_from_thread(self.fail, f"feed {base}{FEED} ended: {exc}")

        def show(self, snap: dict[str, Any]) -> None:
            self.snapshot = snap
            self.updates += 1
            self.query_one("#fleet", Static).update(fleet_view(snap))

        def fail(self, message: str) -> None:
            self.error = message
            self.query_one("#fleet", Static).update(message)

    return FleetTop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvflow top", description="Live fleet view in a terminal.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the frontend's base URL")
    parser.add_argument("--api-key", default=None, help="the frontend's API key, if it has one")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    return parser


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    try:
        import textual  # noqa: F401
    except ImportError:
        print("kvflow top needs textual: pip install 'kvflow[top]'", file=sys.stderr)
        return 2
    if ns.once:
        from kvflow.cli.top_view import render_text

        try:
            print(render_text(fetch_snapshot(ns.url, ns.api_key)), end="")
        except (OSError, ValueError) as exc:
            print(f"kvflow top: cannot read {ns.url}{SNAPSHOT}: {exc}", file=sys.stderr)
            return 1
        return 0
    build_app(ns.url, ns.api_key).run()
    return 0
