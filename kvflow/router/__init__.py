"""KV-cache-aware routing: index of cached blocks, load tracking, cost, policies, replica sync.

Map:
  config.py      KvRouterConfig (frozen) and its --router-* CLI flags
  blocks.py      BlockTable (hash → worker bitmask), prefix matching, OverlapScores
  indexer.py     KvIndex: exact index fed by KV events, gap detection
  recovery.py    GapRecovery: snapshot fetch + event buffering for workers with gaps
  approximate.py ApproxIndex: TTL/LRU index fed by the router's own decisions
  load.py        ActiveLoad, WorkerLoad, is_busy
  pending.py     PendingBlocks: routed prompts' blocks, cached until KV events confirm them
  sessions.py    SessionAffinity: a session's turns go where its history is
  cost.py        cost formula (blocks of prefill work), select_worker, RoutingDecision
  policies.py    registry: kv, least_loaded, round_robin, random, direct
  admission.py   bounded FCFS wait queue while every worker is busy
  sync.py        RoutingSyncMessage between router replicas
  metrics.py     Prometheus metrics
  errors.py      RouterOverloadedError, NoWorkersError, UnknownWorkerError
  router.py      KvRouter: the orchestrator
"""

from kvflow.router.blocks import OverlapScores
from kvflow.router.config import KvRouterConfig, add_router_args, config_from_args
from kvflow.router.cost import RoutingDecision, select_worker
from kvflow.router.errors import (
    NoWorkersError,
    RouterError,
    RouterOverloadedError,
    UnknownWorkerError,
)
from kvflow.router.load import WorkerLoad
from kvflow.router.policies import register_router_policy, router_policy_names
from kvflow.router.router import KvRouter
from kvflow.router.sync import ROUTER_SYNC_SUBJECT, RoutingSyncMessage, decode_sync, encode_sync

__all__ = [
    "ROUTER_SYNC_SUBJECT",
    "KvRouter",
    "KvRouterConfig",
    "NoWorkersError",
    "OverlapScores",
    "RouterError",
    "RouterOverloadedError",
    "RoutingDecision",
    "RoutingSyncMessage",
    "UnknownWorkerError",
    "WorkerLoad",
    "add_router_args",
    "config_from_args",
    "decode_sync",
    "encode_sync",
    "register_router_policy",
    "router_policy_names",
    "select_worker",
]
