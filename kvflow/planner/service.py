"""The `kvflow planner` loop: every interval observe the frontends, decide, and (with --apply) act.

Advisory by default: each decision is logged with its reasons (observed and
predicted load, the estimate for the current and the chosen fleet, the runners-up)
and written to `--decisions-file`; nothing changes until `--apply`. Each interval
first compares the connector's real fleet with the last target and reconciles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kvflow.planner.config import PlannerConfig
from kvflow.planner.connectors import Connector, make_connector
from kvflow.planner.decide import Decision
from kvflow.planner.model import Fleet
from kvflow.planner.observe import FrontendScraper
from kvflow.planner.perf import PerfModel
from kvflow.planner.planner import Planner

log = logging.getLogger(__name__)


def load_perf(path: str) -> PerfModel:
    if path:
        return PerfModel.load(path)
    from kvflow.engines.mocker.timing import TimingModel

    log.warning("planner: no --perf-model given; using the mocker's default timing model "
                "(make a real one with `kvflow profile`)")
    return PerfModel.from_timing(TimingModel())


def build_connector(config: PlannerConfig) -> Connector:
    kwargs: dict[str, object] = {}
    if config.connector == "local":
        kwargs = {"worker_args": config.worker_args, "log_dir": config.worker_log_dir}
    elif config.connector == "kubernetes":
        kwargs = {"targets": config.k8s_scale_targets, "namespace": config.k8s_namespace,
                  "api_server": config.k8s_api_server}
    return make_connector(config.connector, **kwargs)


def describe(d: Decision) -> str:
    parts = [f"planner: {d.action} {d.previous} -> {d.target}: {d.reason}"]
    if d.predicted is not None:
        p = d.predicted
        parts.append(f"predicted {p.rate:.2f} req/s ISL {p.isl:.0f} OSL {p.osl:.0f} "
                     f"cached {p.cached_fraction:.2f}")
    if d.planned is not None:
        parts.append(f"sized for {d.planned.rate:.2f} req/s")
    if d.reserve is not None:
        r = d.reserve
        parts.append(f"and a burst reserve of {r.rate:.2f} req/s (baseline's ISL {r.isl:.0f} OSL {r.osl:.0f} "
                     f"cached {r.cached_fraction:.2f})")
    for o in d.options[:3]:
        parts.append(f"option {o.fleet}: TTFT {o.ttft_s:.3f}s ITL {o.itl_s * 1e3:.1f}ms "
                     f"{'meets' if o.meets else 'misses'}")
    return "; ".join(parts)


def decision_dict(d: Decision) -> dict:
    """The decision as plain JSON values (infinity as null, at any depth: an infeasible option's
    estimate, the open bucket's edge of the predicted load's uncached tokens)."""
    def plain(obj: object) -> object:
        if dataclasses.is_dataclass(obj):
            return plain(dataclasses.asdict(obj))  # type: ignore[arg-type]
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [plain(v) for v in obj]
        if isinstance(obj, float) and obj == float("inf"):
            return None
        return obj
    return plain(d)  # type: ignore[return-value]


class PlannerService:
    def __init__(self, config: PlannerConfig, connector: Connector | None = None,
                 scraper: FrontendScraper | None = None) -> None:
        self.config = config
        self.connector = connector or build_connector(config)
        urls = [u for u in config.frontend_urls.split(",") if u]
        self.scraper = scraper or FrontendScraper(urls, config.model or None)
        start = self.connector.current()
        if config.apply and start.workers < config.min_workers:
            start = Fleet(aggregated=config.min_workers) if config.mode != "disaggregated" else \
                Fleet(prefill=1, decode=max(config.min_workers - 1, 1))
            self.connector.apply(start)
        self.planner = Planner(config.rules(), load_perf(config.perf_model), start, config.predictor,
                               settle_s=config.worker_startup_s, baseline_s=config.baseline_s)
        self.decisions_file = Path(config.decisions_file) if config.decisions_file else None

    def tick(self, now: float) -> Decision:
        """One interval: reconcile, observe, decide, act (with --apply)."""
        if self.config.apply:
            mismatch = self.planner.reconcile(self.connector.current())
            if mismatch:
                log.warning("planner: %s", mismatch)
        obs = self.scraper.observe(now)
        if obs is None and self.scraper.last_error:
            log.info("planner: %s", self.scraper.last_error)
        decision = self.planner.step(now, obs)
        log.info(describe(decision))
        if self.decisions_file is not None:
            with self.decisions_file.open("a") as f:
                f.write(json.dumps(decision_dict(decision)) + "\n")
        if self.config.apply and decision.target != self.connector.current():
            self.connector.apply(decision.target)
        return decision

    async def run(self, stop: asyncio.Event,
                  publish: Callable[[Decision], Awaitable[None]] | None = None) -> None:
        """Tick every interval until `stop`; `publish` each decision (e.g. to the frontends,
        cli/planner.py) on the event loop."""
        mode = "applying" if self.config.apply else "advisory (add --apply to act)"
        log.info("planner: every %.1fs, %s, connector %s, SLA TTFT p90 %.3fs ITL p90 %.1fms",
                 self.config.interval_s, mode, self.config.connector, self.config.ttft_p90_s,
                 self.config.itl_p90_s * 1e3)
        self.scraper.observe(time.monotonic())  # the first interval starts now
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self.config.interval_s)
                except TimeoutError:
                    decision = await asyncio.to_thread(self.tick, time.monotonic())
                    if publish is not None:
                        await publish(decision)
        finally:
            self.connector.close()
