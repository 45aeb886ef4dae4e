"""What `kvflow top` draws: a fleet snapshot (the /fleet feed's JSON) as rich tables.

Pure functions from one snapshot to renderables, shared by the live TUI and `--once`.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

Snapshot = dict[str, Any]


def _kv(pair: list[int]) -> str:
    used, total = pair
    return f"{used}/{total} ({100 * used / total:.0f}%)" if total else "-"


def workers_table(snap: Snapshot) -> Table:
    table = Table(title=f"Workers ({len(snap['workers'])})", expand=True, title_justify="left")
    for col in ("worker", "role", "model", "KV gpu", "KV host", "run", "wait", "tok/s", "index"):
        table.add_column(col, no_wrap=True)
    for w in snap["workers"]:
        table.add_row(Text(w["id"], style="bold yellow"), w["role"], w["model"], _kv(w["kv"]["gpu"]),
                      _kv(w["kv"]["host"]), str(w["running"]), str(w["waiting"]),
                      f"{w['tokens_per_s']:.1f}", str(w["index_blocks"]))
    return table


def prefixes_table(snap: Snapshot) -> Table:
    table = Table(title="Hottest shared prefixes", expand=True, title_justify="left")
    for col in ("prefix", "tokens", "hits", "held by"):
        table.add_column(col, overflow="ellipsis", no_wrap=True)
    for p in snap["prefixes"]:
        table.add_row(repr(p["preview"]), str(p["tokens"]), str(p["hits"]),
                      ", ".join(p["holders"]) or "(evicted)")
    return table


def decisions_table(snap: Snapshot, limit: int = 10) -> Table:
    table = Table(title="Last routing decisions", expand=True, title_justify="left")
    for col in ("time", "request", "chosen", "hit", "candidates (overlap / cost / active)"):
        table.add_column(col, overflow="ellipsis", no_wrap=True)
    for d in snap["decisions"][:limit]:
        cands = "  ".join(f"{c['id']}:{c['overlap']}/"
                          f"{'-' if c['cost'] is None else format(c['cost'], '.1f')}/{c['active']}"
                          for c in d["candidates"])
        table.add_row(time.strftime("%H:%M:%S", time.localtime(d["at"])), d["request_id"][-12:],
                      Text(d["chosen"], style="bold green"), f"{100 * d['hit_rate']:.0f}%", cands)
    return table


def transfers_table(snap: Snapshot, limit: int = 10) -> Table:
    table = Table(title="KV transfers (disaggregated requests)", expand=True,
                  title_justify="left")
    for col in ("time", "request", "prefill -> decode", "backend", "KiB", "prefill ms",
                "transfer ms", "GB/s"):
        table.add_column(col, overflow="ellipsis", no_wrap=True)
    for t in snap["transfers"][:limit]:
        rate = "-" if t["gb_per_s"] is None else f"{t['gb_per_s']:.2f}"
        table.add_row(time.strftime("%H:%M:%S", time.localtime(t["at"])), t["request_id"][-12:],
                      f"{t['prefill_worker']} -> {t['decode_worker']}", t["backend"] or "-",
                      f"{t['bytes'] / 1024:.1f}", f"{t['prefill_ms']:.1f}",
                      f"{t['transfer_ms']:.1f}", rate)
    return table


def _fleet(f: dict[str, int]) -> str:
    if f["prefill"] or f["decode"]:
        return f"{f['prefill']}P + {f['decode']}D"
    return f"{f['aggregated']} aggregated"


def planner_table(snap: Snapshot) -> Table:
    table = Table(title="Planner (latest decision per model)", expand=True, title_justify="left")
    for col in ("time", "model", "action", "workers", "reason", "mode"):
        table.add_column(col, overflow="ellipsis", no_wrap=True)
    for d in snap["planner"]["decisions"]:
        table.add_row(time.strftime("%H:%M:%S", time.localtime(d["received_at"])),
                      d["model"] or "(all)", d["action"],
                      f"{_fleet(d['previous'])} -> {_fleet(d['target'])}", d["reason"],
                      "applied" if d["applied"] else "advisory")
    return table


def fleet_view(snap: Snapshot) -> Group:
    parts: list[Any] = [workers_table(snap), prefixes_table(snap), decisions_table(snap)]
    if snap.get("transfers"):
        parts.append(transfers_table(snap))
    if snap.get("planner"):
        parts.append(planner_table(snap))
    return Group(*parts)


def render_text(snap: Snapshot, width: int = 160) -> str:
    """The whole view as plain text (for `kvflow top --once` and tests)."""
    console = Console(width=width, record=True, color_system=None, file=_Null())
    console.print(fleet_view(snap))
    return console.export_text()


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass
