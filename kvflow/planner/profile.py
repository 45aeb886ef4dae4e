"""`kvflow profile`: measure one worker of an engine configuration and write its PerfModel table.

It starts `kvflow run in=http out=ENGINE ENGINE_ARGS` on a free port, then over
HTTP: the prefill sweep sends one fresh prompt of each length alone with one output
token (its TTFT is the prefill time, frontend included); the decode sweep runs B
concurrent requests of context C and takes their mean inter-token latency as the
step time at batch B. Prompts are token ids no cache has seen, so nothing is a hit.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvflow.planner.perf import DECODE_BATCH, DECODE_CONTEXT, PREFILL_ISL, PerfModel
from kvflow.replay.http import Target, send_one
from kvflow.replay.trace import TraceRequest
from kvflow.runtime import launcher


@dataclass(frozen=True)
class ProfilePlan:
    prefill_isl: tuple[int, ...] = PREFILL_ISL[:6]
    decode_batch: tuple[int, ...] = DECODE_BATCH[:5]
    decode_context: tuple[int, ...] = DECODE_CONTEXT[:3]
    decode_tokens: int = 24
    repeats: int = 3
    max_batch: int = 256


class Stack:
    """`kvflow run` as a child process; `url` once its model is ready."""

    def __init__(self, engine: str, engine_args: list[str], ready_timeout: float = 300.0) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="kvflow-profile-", suffix=".log", delete=False)
        self.proc = launcher.launch("run", ["in=http", f"out={engine}", "--http-port", "0", *engine_args],
                                    launcher.child_env(), log_path=self.log.name)
        self.url = self._wait(ready_timeout)

    def _wait(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text(errors="replace")
            found = re.search(r"ready at (http://\S+)/v1", text)
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker stack exited ({self.proc.returncode}):\n{text[-2000:]}")
            time.sleep(0.1)
        self.close()
        raise RuntimeError(f"the worker stack was not ready after {timeout:.0f}s (log: {self.log.name})")

    def close(self) -> None:
        launcher.stop([self.proc])
        self.log.close()


def _fresh(isl: int, osl: int, salt: int) -> TraceRequest:
    return TraceRequest(0.0, isl, osl, hash_ids=(salt * 1_000_003 + isl,))


async def _prefill(target: Target, isl: int, plan: ProfilePlan, salt: list[int]) -> float:
    times = []
    for _ in range(plan.repeats):
        salt[0] += 1
        result = await send_one(target, _fresh(isl, 1, salt[0]), salt[0], 300)
        if result.error:
            raise RuntimeError(f"prefill of {isl} tokens failed: {result.error}")
        times.append(result.ttft_s)
    return statistics.median(times)


async def _decode(target: Target, batch: int, context: int, plan: ProfilePlan, salt: list[int]) -> float:
    salt[0] += batch
    reqs = [_fresh(context, plan.decode_tokens, salt[0] + i) for i in range(batch)]
    results = await asyncio.gather(*(send_one(target, r, salt[0] + i, 300) for i, r in enumerate(reqs)))
    bad = [r.error for r in results if r.error]
    if bad:
        raise RuntimeError(f"decode at batch {batch} failed: {bad[0]}")
    return statistics.median(r.itl_s for r in results)


async def measure(url: str, model: str, plan: ProfilePlan) -> PerfModel:
    target = Target.from_url(url, model)
    salt = [int(time.time())]
    prefill = [await _prefill(target, n, plan, salt) for n in plan.prefill_isl]
    decode = [[await _decode(target, b, c, plan, salt) for c in plan.decode_context]
              for b in plan.decode_batch]
    return PerfModel(list(plan.prefill_isl), prefill, list(plan.decode_batch), list(plan.decode_context),
                     decode, plan.max_batch, source=f"kvflow profile of {url}")
