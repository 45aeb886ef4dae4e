"""Engine-agnostic core shared by the mocker and the native engine: scheduler and KV block pool.

- block_pool.py: fixed KV blocks, reference counts, prefix cache, KV events, snapshots.
- sequence.py: one request as the scheduler sees it (tokens, computed tokens, blocks, stop rule).
- scheduler.py: waiting/running queues, token budget, chunked prefill, preemption, finishes.
- loads.py: requests parked while a KV connector (kvflow.kv.connector) fills their blocks.
"""

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.scheduler import (
    FinishedSeq,
    RequestRejected,
    ScheduledSeq,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from kvflow.engines.core.sequence import SeqStatus, Sequence, StopRule
from kvflow.kv.connector import ExternalMatch, KvConnector

__all__ = [
    "BlockPool",
    "ExternalMatch",
    "FinishedSeq",
    "KvConnector",
    "RequestRejected",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SeqStatus",
    "Sequence",
    "StopRule",
]
