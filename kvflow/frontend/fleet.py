"""GET /fleet, /fleet/events, /fleet/snapshot: the live fleet view (page, SSE feed, JSON).

One snapshot lists, per served model, every worker of every pool (instance id in hex, as
logs and metrics name it; role: aggregated, or prefill/decode for a disaggregated model;
KV blocks by tier, running/waiting, tokens/s), the hottest shared prefixes with the
workers holding them, the last routing decisions with every candidate's overlap, load and
cost, and the KV transfers of recent disaggregated requests (prefill worker, decode
worker, backend, bytes, prefill and transfer time). The page (`fleet_page.PAGE`, no external assets)
and `kvflow top` both read the SSE feed, one snapshot every `INTERVAL_S`.

With API keys set these routes need one too (their access class is "fleet" in
routes.py): `Authorization: Bearer <key>`, or `?key=<key>` for a browser.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgspec

from kvflow.frontend.disagg import ModelFleet, RequestTiming
from kvflow.frontend.fleet_page import PAGE
from kvflow.frontend.handlers import FrontendState
from kvflow.frontend.http_response import HttpRequest, Responder
from kvflow.frontend.models import ModelManager
from kvflow.router.observe import DecisionRecord, HotPrefix, WorkerView

INTERVAL_S = 0.5
RATE_WINDOW_S = 5.0
MAX_STREAM_S = 3600.0  # browsers reconnect an EventSource by themselves
HTML = b"text/html; charset=utf-8"
_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True)
class _Sample:
    at: float
    tokens: dict[str, int]


class TokenRates:
    """Output tokens/s per worker over the last few seconds, from cumulative counts."""

    def __init__(self) -> None:
        self._samples: deque[_Sample] = deque()

    def update(self, totals: dict[str, int], now: float) -> dict[str, float]:
        samples = self._samples
        samples.append(_Sample(now, totals))
        while len(samples) > 2 and now - samples[1].at >= RATE_WINDOW_S:
            samples.popleft()
        return {w: self._rate(w, n, now) for w, n in totals.items()}

    def _rate(self, worker: str, tokens: int, now: float) -> float:
        """Since the oldest sample in the window that knew the worker (it may be new)."""
        for sample in self._samples:
            if worker in sample.tokens:
                span = now - sample.at
                return max(tokens - sample.tokens[worker], 0) / span if span > 0 else 0.0
        return 0.0


def _worker(model: str, role: str, w: WorkerView, rate: float) -> dict[str, Any]:
    return {
        "id": f"{w.worker_id:x}", "model": model, "role": role,
        "kv": {"gpu": [w.gpu_blocks_used, w.gpu_blocks_total],
               "host": [w.host_blocks_used, w.host_blocks_total]},
        "index_blocks": w.index_blocks, "running": w.running, "waiting": w.waiting,
        "routed_active": w.routed_active, "tokens_total": w.tokens_total,
        "tokens_per_s": round(rate, 1),
    }


def _decision(model: str, rec: DecisionRecord) -> dict[str, Any]:
    d = rec.decision
    candidates = [{
        "id": f"{w:x}", "overlap": d.overlaps.get(w, 0),
        "cost": round(d.costs[w], 3) if w in d.costs else None,
        "prefill_tokens": load.prefill_tokens, "decode_blocks": load.decode_blocks,
        "active": load.active_requests,
    } for w, load in d.loads.items()]
    candidates.sort(key=lambda c: (c["cost"] is None, c["cost"] or 0.0))
    return {"at": rec.at, "model": model, "request_id": rec.request_id,
            "chosen": f"{d.worker_id:x}", "policy": d.policy, "overlap": d.overlap_blocks,
            "blocks": d.request_blocks, "hit_rate": round(d.predicted_hit_rate, 3),
            "candidates": candidates}


def _prefix(model: str, p: HotPrefix, block_size: int, text: str) -> dict[str, Any]:
    return {"model": model, "blocks": p.blocks, "tokens": p.blocks * block_size, "hits": p.hits,
            "holders": [f"{w:x}" for w in p.holders], "preview": text}


def _transfer(t: RequestTiming) -> dict[str, Any]:
    """One disaggregated request: where it was prefilled, where its KV went, how fast."""
    rate = t.kv_bytes / t.transfer_s / 1e9 if t.transfer_s > 0 else None
    return {"at": t.at, "model": t.model, "request_id": t.request_id,
            "prefill_worker": f"{t.prefill_worker:x}", "decode_worker": f"{t.decode_worker:x}",
            "backend": t.backend, "bytes": t.kv_bytes, "prefill_ms": round(t.prefill_s * 1e3, 2),
            "transfer_ms": round(t.transfer_s * 1e3, 2),
            "decode_first_ms": round(t.decode_first_s * 1e3, 2),
            "gb_per_s": round(rate, 3) if rate is not None else None}


class FleetFeed:
    """Builds fleet snapshots from the served models' routers."""

    def __init__(self) -> None:
        self._rates = TokenRates()

    def snapshot(self, state: FrontendState) -> dict[str, Any]:
        now = time.time()
        fleets: list[tuple[str, ModelFleet, Any]] = []
        for model in state.models.list():
            if model.fleet is not None:
                fleets.append((model.name, model.fleet(), model.tokenizer))
        totals = {f"{w.worker_id:x}": w.tokens_total
                  for _, f, _ in fleets for _, v in f.pools for w in v.workers}
        rates = self._rates.update(totals, time.monotonic())
        workers, decisions, prefixes, transfers = [], [], [], []
        for name, fleet, tokenizer in fleets:
            for role, view in fleet.pools:
                workers += [_worker(name, role, w, rates.get(f"{w.worker_id:x}", 0.0))
                            for w in view.workers]
                decisions += [_decision(name, d) for d in view.decisions]
                prefixes += [_prefix(name, p, view.block_size, tokenizer.decode(p.preview))
                             for p in view.prefixes]
            transfers += [_transfer(t) for t in fleet.transfers]
        decisions.sort(key=lambda d: d["at"], reverse=True)
        prefixes.sort(key=lambda p: p["hits"], reverse=True)
        transfers.sort(key=lambda t: t["at"], reverse=True)
        return {"at": now, "models": [n for n, _, _ in fleets], "workers": workers,
                "decisions": decisions[:20], "prefixes": prefixes[:8],
                "transfers": transfers[:20], "planner": state.planner.snapshot()}


_FEEDS: weakref.WeakKeyDictionary[ModelManager, FleetFeed] = weakref.WeakKeyDictionary()


def _feed(state: FrontendState) -> FleetFeed:
    """One feed per frontend (per model manager), so token rates span all its clients."""
    feed = _FEEDS.get(state.models)
    if feed is None:
        feed = _FEEDS[state.models] = FleetFeed()
    return feed


async def fleet_page(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    responder.send(200, PAGE, content_type=HTML)


async def fleet_snapshot(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    responder.send(200, _ENCODER.encode(_feed(state).snapshot(state)))


async def fleet_events(state: FrontendState, request: HttpRequest, responder: Responder) -> None:
    """A snapshot every INTERVAL_S as `data:` events until the client goes away."""
    feed = _feed(state)
    responder.start_stream()
    deadline = time.monotonic() + MAX_STREAM_S
    while not responder.disconnected() and time.monotonic() < deadline:
        if responder.write(b"data: " + _ENCODER.encode(feed.snapshot(state)) + b"\n\n"):
            await responder.drain()
        await asyncio.sleep(INTERVAL_S)
    responder.end()
