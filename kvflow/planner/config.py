"""PlannerConfig: the `kvflow planner` process's settings, frozen; flags, env and file keys derive from it."""

from __future__ import annotations

from dataclasses import dataclass

from kvflow.planner.decide import MODES, Bounds, Rules, Sla
from kvflow.planner.predict import predictor_names


@dataclass(frozen=True)
class PlannerConfig:
    """Defaults here are the documented ones (docs/planner.md)."""

    frontend_urls: str = "http://127.0.0.1:8000"  # comma-separated; their /metrics are observed
    model: str = ""  # count only this model's traffic ("" = all)
    interval_s: float = 10.0
    ttft_p90_s: float = 1.0
    itl_p90_s: float = 0.04
    mode: str = "aggregated"  # aggregated | disaggregated | auto
    min_workers: int = 1
    max_workers: int = 8
    gpu_budget: int = 0  # GPUs in all; 0 = only max_workers limits
    gpus_per_worker: int = 1
    predictor: str = "kalman"
    headroom: float = 0.1
    burst_ratio: float = 0.0  # keep capacity for this multiple of the baseline (median) rate; 0 = off
    baseline_s: float = 120.0  # the baseline is the median rate over this many seconds, bursts left out
    # also plan for the requests held at the routers (--router-max-* thresholds), served
    # within this many seconds on top of the arrivals; 0 = off
    backlog_drain_s: float = 0.0
    scale_down_intervals: int = 3  # hysteresis: intervals in a row that must want a scale-down
    cooldown_s: float = 60.0  # after any change, before a scale-down
    max_scale_down_step: int = 1
    worker_startup_s: float = 30.0  # from asking for a worker to its first request: no calibration meanwhile
    perf_model: str = ""  # JSON from `kvflow profile`; "" = the mocker's default timing model
    connector: str = "virtual"  # virtual | local | kubernetes
    worker_args: str = ""  # local connector: arguments of each `kvflow worker`
    worker_log_dir: str = ""
    k8s_scale_targets: str = ""  # role=<plural>.<group>/<name>,... (the operator passes them)
    k8s_namespace: str = "default"
    k8s_api_server: str = ""  # "" = in-cluster service account; or e.g. http://127.0.0.1:8001
    apply: bool = False  # advisory unless set: decisions are logged, nothing changes
    decisions_file: str = ""  # append each decision as a JSON line

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.predictor not in predictor_names():
            raise ValueError(f"--predictor must be one of {', '.join(predictor_names())}; "
                             f"got {self.predictor!r}")
        if self.interval_s <= 0 or self.min_workers < 0 or self.max_workers < max(self.min_workers, 1):
            raise ValueError("need interval_s > 0 and 0 <= min_workers <= max_workers (>= 1)")

    def rules(self) -> Rules:
        return Rules(Sla(self.ttft_p90_s, self.itl_p90_s),
                     Bounds(self.min_workers, self.max_workers, self.gpu_budget, self.gpus_per_worker),
                     self.mode, self.headroom, self.burst_ratio, self.scale_down_intervals, self.cooldown_s,
                     self.max_scale_down_step, self.backlog_drain_s)
