"""Session affinity: a conversation's next turn goes where its history is cached.

A request may carry a session key (the frontend takes it from the `x-session-id` header
or the OpenAI `user` field). After routing, the session remembers the worker and the
prompt's full blocks (their count and the last block's sequence hash). The next turn of
the session extends that prompt; when its block at the same position has the same
sequence hash (sequence hashes chain, so the whole history matches), the policy counts
those blocks as cached on that worker even before or without KV events, so the turn
lands on its history unless the wait there costs more than recomputing it elsewhere.
A turn whose prompt no longer starts with the history (edited, re-rendered) falls back
to plain KV overlap. A `BlocksRemoved` event for the history's last block on that worker
refutes the entry; idle sessions expire after `ttl_s`, the least recent beyond
`max_sessions` go first. Router replicas share entries through sync messages.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvflow.llm.kv_events import AllCleared, BlocksRemoved, KvEvent


@dataclass(frozen=True, slots=True)
class SessionEntry:
    worker_id: int
    # Full prompt blocks of the session's last routed turn, and the last one's hash.
    blocks: int
    last_hash: int
    expires: float


@dataclass(frozen=True, slots=True)
class SessionHint:
    """Where a request's session history is: its worker and the prompt blocks it holds."""

    worker_id: int
    blocks: int


class SessionAffinity:
    def __init__(self, ttl_s: float, max_sessions: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert ttl_s > 0 and max_sessions > 0
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._entries: OrderedDict[str, SessionEntry] = OrderedDict()
        # (worker, last block hash) → session keys, to refute entries on eviction.
        self._by_block: dict[tuple[int, int], set[str]] = {}

    def lookup(self, key: str, block_hashes: Sequence[int]) -> SessionHint | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._drop(key)
            return None
        n = entry.blocks
        matches = 0 < n <= len(block_hashes) and block_hashes[n - 1] == entry.last_hash
        return SessionHint(entry.worker_id, n if matches else 0)

    def record(self, key: str, worker_id: int, blocks: int, last_hash: int) -> None:
        """The session's turn with `blocks` full prompt blocks went to `worker_id`."""
        if key in self._entries:
            self._drop(key)
        self._entries[key] = SessionEntry(worker_id, blocks, last_hash,
                                          self._clock() + self._ttl_s)
        if blocks:
            self._by_block.setdefault((worker_id, last_hash), set()).add(key)
        while len(self._entries) > self._max:
            self._drop(next(iter(self._entries)))

    def refute(self, worker_id: int, removed: Iterable[int]) -> None:
        """The worker evicted these blocks: sessions whose history ends in one are gone."""
        if not self._by_block:
            return
        for h in removed:
            for key in self._by_block.pop((worker_id, h), ()):
                self._entries.pop(key, None)

    def apply(self, events: Iterable[KvEvent]) -> None:
        """Evictions in a worker's KV events refute the sessions whose history they end."""
        for event in events:
            if isinstance(event.data, BlocksRemoved):
                self.refute(event.worker_id, event.data.block_hashes)
            elif isinstance(event.data, AllCleared):
                self.remove_worker(event.worker_id)

    def remove_worker(self, worker_id: int) -> None:
        for key in [k for k, e in self._entries.items() if e.worker_id == worker_id]:
            self._drop(key)

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        keys = self._by_block.get((entry.worker_id, entry.last_hash))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_block[(entry.worker_id, entry.last_hash)]
