"""Frozen configuration of the KV-aware router, with its CLI flags taken from the defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from kvflow.router.load import WorkerLoad, is_busy


@dataclass(frozen=True)
class KvRouterConfig:
    """Everything a `KvRouter` needs to know; validated once, never mutated."""

    # Which registered policy picks workers: kv, round_robin, random, least_loaded, direct.
    policy: str = "kv"
    # Tokens per KV block; must equal the engines' block size or nothing ever matches.
    block_size: int = 16
    # Weights of the cost (cost.py), whose unit is a block of prefill work: prefill blocks
    # (queued and new) count `prefill_load_scale`, active decode blocks `decode_load_scale`.
    prefill_load_scale: float = 1.0
    decode_load_scale: float = 0.1
    # A routed prompt's blocks count as cached on its worker until KV events confirm or
    # refute them, for at most this long (0 = off; approximate mode never books them).
    pending_ttl_s: float = 5.0
    # Session affinity (requests with a session key): idle sessions are forgotten after
    # this long, the least recent beyond max_sessions first.
    session_ttl_s: float = 600.0
    max_sessions: int = 100_000
    # 0 picks the cheapest worker; > 0 samples by softmax over normalized costs.
    temperature: float = 0.0
    # True: follow engines' KV events. False: approximate mode (assume routed prompts stay
    # cached on the chosen worker for `approx_ttl_s`, at most `approx_max_blocks` entries).
    use_kv_events: bool = True
    approx_ttl_s: float = 120.0
    approx_max_blocks: int = 1_000_000
    # Busy thresholds (None = off): a worker is busy when its active decode blocks exceed
    # this fraction of its total blocks, when it runs this many routed requests, or when
    # this many prompt tokens wait for prefill there. While every worker is busy, requests
    # wait at the router (and go to whichever worker frees first or joins), not in one
    # worker's queue.
    max_decode_fraction: float | None = None
    max_active_requests: int | None = None
    max_prefill_tokens: int | None = None
    # When every worker is busy, requests wait FCFS in a queue of this size for this long.
    max_queue: int = 1024
    queue_timeout_s: float = 30.0
    retry_after_s: float = 1.0
    # Gap recovery: snapshot fetch attempts, first backoff, and events buffered meanwhile.
    recovery_attempts: int = 5
    recovery_backoff_s: float = 0.1
    max_buffered_events: int = 10_000
    # The event id an engine gives its first event (engines count from 1; a fresh cache's
    # snapshot has last_event_id 0); a worker first seen at a later id is recovered.
    first_event_id: int = 1
    # Seed of the router's random number generator (None = from the OS).
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(self.block_size > 0, "block_size", self.block_size, "a positive token count")
        _check(self.prefill_load_scale >= 0, "prefill_load_scale", self.prefill_load_scale,
               "zero or more")
        _check(self.decode_load_scale >= 0, "decode_load_scale", self.decode_load_scale,
               "zero or more")
        _check(self.pending_ttl_s >= 0, "pending_ttl_s", self.pending_ttl_s, "zero or more seconds")
        _check(self.session_ttl_s > 0, "session_ttl_s", self.session_ttl_s, "positive seconds")
        _check(self.max_sessions > 0, "max_sessions", self.max_sessions, "a positive count")
        _check(self.temperature >= 0, "temperature", self.temperature, "zero or more")
        _check(self.approx_ttl_s > 0, "approx_ttl_s", self.approx_ttl_s, "positive seconds")
        _check(self.approx_max_blocks > 0, "approx_max_blocks", self.approx_max_blocks,
               "a positive count")
        frac = self.max_decode_fraction
        _check(frac is None or 0 < frac <= 1, "max_decode_fraction", frac, "in (0, 1]")
        cap = self.max_active_requests
        _check(cap is None or cap > 0, "max_active_requests", cap, "a positive count")
        ptok = self.max_prefill_tokens
        _check(ptok is None or ptok > 0, "max_prefill_tokens", ptok, "a positive token count")
        _check(self.max_queue >= 0, "max_queue", self.max_queue, "zero or more")
        _check(self.queue_timeout_s > 0, "queue_timeout_s", self.queue_timeout_s,
               "positive seconds")
        _check(self.recovery_attempts > 0, "recovery_attempts", self.recovery_attempts,
               "a positive count")
        _check(self.max_buffered_events > 0, "max_buffered_events", self.max_buffered_events,
               "a positive count")

    @property
    def has_busy_threshold(self) -> bool:
        return (self.max_decode_fraction is not None or self.max_active_requests is not None
                or self.max_prefill_tokens is not None)

    def is_busy(self, load: WorkerLoad) -> bool:
        """Whether the worker is at or over one of this config's busy thresholds."""
        return is_busy(load, self.max_decode_fraction, self.max_active_requests,
                       self.max_prefill_tokens)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"router config: {name}={value!r} is invalid; it must be {expected}")


_DEFAULTS = KvRouterConfig()


def add_router_args(parser: argparse.ArgumentParser) -> None:
    """Add `--router-*` flags whose defaults come from `KvRouterConfig`."""
    from kvflow.router.policies import router_policy_names
    from kvflow.runtime.config import field_help

    helps = field_help(KvRouterConfig)
    group = parser.add_argument_group("router (KV-aware worker selection)")
    for f in fields(KvRouterConfig):
        flag = "--router-" + f.name.replace("_", "-")
        default = getattr(_DEFAULTS, f.name)
        text = f"{helps.get(f.name, '')} (default: %(default)s)".replace("%", "%%").replace(
            "%%(default)s", "%(default)s")
        if f.name == "policy":
            group.add_argument(flag, default=default, choices=router_policy_names(), help=text)
        elif isinstance(default, bool):
            group.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=text)
        else:
            group.add_argument(flag, default=default, type=_parser_for(f.name), help=text,
                               metavar=f.name.upper())


def _parser_for(name: str) -> type:
    annotation = {f.name: f.type for f in fields(KvRouterConfig)}[name]
    text = str(annotation)
    return float if "float" in text else int


def config_from_args(ns: argparse.Namespace) -> KvRouterConfig:
    """Build the config from flags added by `add_router_args`."""
    return KvRouterConfig(**{f.name: getattr(ns, "router_" + f.name) for f in fields(KvRouterConfig)})
