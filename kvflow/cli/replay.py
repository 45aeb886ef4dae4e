"""`kvflow replay TRACE --url URL`: send a timestamped trace to a frontend (or `--simulate` it) and report.

Prints TTFT/ITL p50/p90 per window and the share of windows meeting the SLA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from kvflow.replay.report import attainment, format_windows, windows
from kvflow.replay.trace import TraceError, load_trace


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvflow replay", description=__doc__.split("\n")[0])
    p.add_argument("trace", help="JSON lines: timestamp (ms) or arrival_s, input_length, output_length, "
                                 "optional hash_ids / token_ids (the Mooncake trace format works)")
    p.add_argument("--url", default="", help="the frontend, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default="", help="model name to request (default: the frontend's only one)")
    p.add_argument("--api-key", default="", help="Bearer key, when the frontend has one")
    p.add_argument("--time-scale", type=float, default=1.0, help="2 = twice as slow (default 1)")
    p.add_argument("--limit", type=int, default=0, help="replay only the first N requests")
    p.add_argument("--window-s", type=float, default=60.0, help="report window (default 60 s)")
    p.add_argument("--ttft-sla", type=float, default=1.0, help="TTFT p90 target, s (default 1.0)")
    p.add_argument("--itl-sla", type=float, default=0.04, help="ITL p90 target, s (default 0.04)")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, s (default 300)")
    p.add_argument("--simulate", action="store_true",
                   help="no frontend: mocker workers on a virtual clock (much faster than real time)")
    p.add_argument("--workers", type=int, default=1, help="--simulate: aggregated workers (default 1)")
    p.add_argument("--router-max-active-requests", type=int, default=None,
                   help="--simulate: the router's busy threshold in requests per worker; while every "
                        "worker is busy, requests wait at the router (default: off)")
    p.add_argument("--router-max-prefill-tokens", type=int, default=None,
                   help="--simulate: the router's busy threshold in queued prefill tokens (default: off)")
    p.add_argument("--json", action="store_true", help="print the windows as JSON lines")
    return p


def main(argv: list[str]) -> int:
    ns = _parser().parse_args(argv)
    try:
        trace = load_trace(ns.trace, ns.time_scale)
    except TraceError as exc:
        print(f"kvflow replay: {exc}", file=sys.stderr)
        return 2
    if ns.limit:
        trace = trace[: ns.limit]
    started = time.monotonic()
    if ns.simulate:
        from kvflow.replay.sim import Simulation
        from kvflow.router.config import KvRouterConfig

        try:
            router = KvRouterConfig(max_active_requests=ns.router_max_active_requests,
                                    max_prefill_tokens=ns.router_max_prefill_tokens)
        except ValueError as exc:
            print(f"kvflow replay: {exc}", file=sys.stderr)
            return 2
        results = Simulation(trace, workers=ns.workers, router=router).run().results
    else:
        results = _over_http(ns, trace)
        if results is None:
            return 2
    stats = windows(results, ns.window_s, ns.ttft_sla, ns.itl_sla)
    if ns.json:
        for w in stats:
            print(json.dumps(w.__dict__))
    else:
        print(format_windows(stats))
    failed = sum(1 for r in results if r.error)
    print(f"requests {len(results)} failed {failed}; SLA attainment {attainment(stats):.1%} "
          f"of {len(stats)} windows; took {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 1 if failed else 0


def _over_http(ns: argparse.Namespace, trace: list) -> list | None:
    from kvflow.replay.http import Target, replay_http

    if not ns.url:
        print("kvflow replay: give --url http://HOST:PORT of a frontend, or --simulate", file=sys.stderr)
        return None
    try:
        target = Target.from_url(ns.url, ns.model or _only_model(ns.url, ns.api_key))
    except (ValueError, OSError) as exc:
        print(f"kvflow replay: {exc}", file=sys.stderr)
        return None
    return asyncio.run(replay_http(trace, target, ns.timeout))


def _only_model(url: str, api_key: str) -> str:
    import urllib.request

    req = urllib.request.Request(url.rstrip("/") + "/v1/models",
                                 headers={"authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        models = [m["id"] for m in json.loads(resp.read())["data"]]
    if len(models) != 1:
        raise ValueError(f"the frontend serves {models or 'no models'}; pick one with --model")
    return models[0]
