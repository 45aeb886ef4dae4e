"""`kvflow profile --out PERF.json ENGINE [ENGINE ARGS]`: measure a worker for the planner's model."""

from __future__ import annotations

import argparse
import asyncio
import sys

from kvflow.planner.profile import ProfilePlan, Stack, measure


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="kvflow profile",
        description="Start one worker of ENGINE (with the engine arguments that follow), sweep prompt "
                    "lengths and decode batches over HTTP, write the table `kvflow planner "
                    "--perf-model` reads. Example: kvflow profile --out perf.json mocker "
                    "--model-path DIR --speedup-ratio 1")
    plan = ProfilePlan()
    p.add_argument("engine", help="engine name, as in `kvflow run out=ENGINE`")
    p.add_argument("--out", required=True, help="where to write the JSON table")
    p.add_argument("--isl", type=_ints, default=plan.prefill_isl, help="prompt lengths to time")
    p.add_argument("--batch", type=_ints, default=plan.decode_batch, help="decode batch sizes")
    p.add_argument("--context", type=_ints, default=plan.decode_context, help="decode context lengths")
    p.add_argument("--decode-tokens", type=int, default=plan.decode_tokens, help="tokens per decode run")
    p.add_argument("--repeats", type=int, default=plan.repeats, help="prefill repeats (median)")
    p.add_argument("--max-batch", type=int, default=plan.max_batch, help="the engine's max running seqs")
    ns, engine_args = p.parse_known_args(argv)
    plan = ProfilePlan(ns.isl, ns.batch, ns.context, ns.decode_tokens, ns.repeats, ns.max_batch)
    try:
        stack = Stack(ns.engine, engine_args)
    except RuntimeError as exc:
        print(f"kvflow profile: {exc}", file=sys.stderr)
        return 1
    try:
        model = asyncio.run(measure(stack.url, _model_name(stack.url), plan))
    finally:
        stack.close()
    with open(ns.out, "w") as f:
        f.write(model.to_json())
    prefill = dict(zip(model.prefill_isl, (round(s, 4) for s in model.prefill_s), strict=True))
    print(f"kvflow profile: wrote {ns.out}: prefill seconds by prompt length {prefill}")
    return 0


def _model_name(url: str) -> str:
    import json
    import urllib.request

    with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
        return json.loads(resp.read())["data"][0]["id"]
